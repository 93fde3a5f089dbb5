"""What a config asks of the machine it starts on, checked before storage and Ray: the config's own
checks look at values alone (config/checks.py); these import and ask. Each failure is a ConfigError
naming the field, as a bad value's is."""

from __future__ import annotations

from ..config.schema import TrainConfig
from ..errors import ConfigError


def preflight(config: TrainConfig) -> None:
    """Raise ConfigError where this machine cannot do what `config` asks: the tensorboard package for
    tensorboard, an output_dir URL's fsspec backend."""
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ConfigError("tensorboard",
                              "needs the tensorboard package: pip install 'raytorch[tensorboard]'") from e
    if config.output_dir and "://" in config.output_dir:
        from ..persist.storage import check_url  # here, not at the top: fsspec only for a URL

        check_url(config.output_dir, "output_dir")
