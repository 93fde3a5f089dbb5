"""Config: the TrainConfig schema (a docstring per field, YAML in and out; schema.py), its checks of
values alone, run at creation (checks.py: no import of optional packages, no filesystem or network,
so a config is checked anywhere, fast), what the built-in names stand for with the CLI's recipes
(recipes.py), and loading what a config names as `pkg.module:attr` (imports.py, used when a run is
built). No Ray, no torch.

Imports: `raytorch.errors`; nothing else of raytorch's."""

from .checks import callback_specs
from .imports import imported_fns, is_import_path, load
from .recipes import BUILT_IN_CALLBACKS, BUILT_IN_DATASETS, BUILT_IN_MODELS, RECIPES, elastic_range, with_recipe
from .schema import RUN_DEFINING, TrainConfig, field_choices, field_docs, read_yaml, run_defining

__all__ = ["TrainConfig", "RUN_DEFINING", "run_defining", "field_docs", "field_choices", "read_yaml",
           "callback_specs", "load", "is_import_path", "imported_fns", "with_recipe", "elastic_range", "RECIPES",
           "BUILT_IN_MODELS", "BUILT_IN_DATASETS", "BUILT_IN_CALLBACKS"]
