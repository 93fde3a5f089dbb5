"""Tasks: what a config's model, dataset and loss name, made real. The built-in models, datasets
and losses (builtin.py: plain PyTorch), and `training(config)`, which resolves the config's names,
built-in or `pkg.module:factory`, into the callables a Trainer takes (resolve.py).

Imports: `raytorch.errors`, `raytorch.config`, `raytorch.data`."""
