"""raytorch: data-parallel PyTorch training orchestrated by Ray.

N replicas compute the same training run as one process, to float tolerance, whatever N is.
"""

from .config.schema import TrainConfig
from .core.seeded_forward import seeded_forward
from .data.augment import sample_generator, seeded
from .driver.trainer import Trainer, TrainResult
from .errors import CheckpointError, ClusterError, ConfigError, NonFiniteError, RaytorchError, ReplicaError
from .output.callbacks import Callback

__all__ = ["TrainConfig", "Trainer", "TrainResult", "RaytorchError", "ConfigError",
           "ClusterError", "ReplicaError", "NonFiniteError", "CheckpointError", "sample_generator", "seeded",
           "seeded_forward",
           "Callback"]
