"""Group: a run's replicas as Ray actors, and the only caller of Ray for them. `ReplicaGroup`
starts them (`launch`, `settle`), makes the driver's calls with typed answers, finds the dead and
the hung, replaces, moves and takes in replicas (`Roster`: spares, elastic growth, draining
nodes), and sets up the wire between them; Ray's errors become raytorch's in `errors.py`. Also
here: reserving the cluster's room (`placement`), starting or joining Ray on loopback (`cluster`,
`watchdog`). It reports losses; the driver decides what to do about them.

Imports: Ray, and raytorch's errors, config, core, compat, wire, replica; never the driver."""
