"""Output: everything a run tells its user, through one sink (RunOutput, sink.py): the Callback
base and its dispatch, the console (event lines, warnings, the progress bar) and its line texts,
the run directory, the driver's Ray metrics and the progress lines for the dashboard's actor log.

Imports: `raytorch.errors`, `raytorch.config`, `raytorch.core` (and the layer beside wire: compat,
data, persist, tasks); never replica, group or driver."""
