"""raytorch: data-parallel PyTorch training orchestrated by Ray.

N replicas compute the same training run as one process, to float tolerance, whatever N is.
"""

from .augment import sample_generator, seeded
from .callbacks import Callback
from .config import TrainConfig
from .driver import Trainer, TrainResult
from .errors import CheckpointError, ClusterError, ConfigError, NonFiniteError, RaytorchError, ReplicaError

__all__ = ["TrainConfig", "Trainer", "TrainResult", "RaytorchError", "ConfigError",
           "ClusterError", "ReplicaError", "NonFiniteError", "CheckpointError", "sample_generator", "seeded",
           "Callback"]
