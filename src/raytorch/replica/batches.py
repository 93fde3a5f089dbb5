"""What a replica does with a batch: move it to its device, whatever its shape, and turn it into a
loss, by the user's step_fn(model, batch) or by the supervised default, loss_fn(model(x), y).
Plain PyTorch: no Ray. The checks here give one line that says what to change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils.data import default_collate

from ..errors import ConfigError


def tensors_mapped(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """`batch` with fn applied to every tensor in it: tensors, dicts, lists, tuples and named
    tuples, nested; anything else (strings, ids) as it is."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: tensors_mapped(fn, value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(tensors_mapped(fn, value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(tensors_mapped(fn, value) for value in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor in it moved to `device`."""
    return tensors_mapped(lambda t: t.to(device, non_blocking=True), batch)


def pin_memory(batch: Any) -> Any:
    """`batch` with every tensor in it in pinned memory: copies to a GPU that do not block."""
    return tensors_mapped(torch.Tensor.pin_memory, batch)


def describe(item: Any) -> str:
    """A dataset item or batch in a few words, for error messages."""
    if isinstance(item, torch.Tensor):
        return f"a {item.dtype} tensor of shape {tuple(item.shape)}"
    if isinstance(item, Mapping):
        return f"a dict of {', '.join(map(str, list(item)[:6]))}"
    if isinstance(item, (list, tuple)):
        return f"a {type(item).__name__} of {len(item)}"
    return f"a {type(item).__name__}"


class SupervisedStep:
    """The default step: loss_fn(model(x), y) on batches of (x, y) pairs."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn

    @staticmethod
    def split(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"loss_fn takes batches of (input, target) pairs, but the items collate to {describe(batch)}: "
                        f"give step_fn(model, batch) -> loss instead (--step pkg.module:fn)")

    def loss(self, output: Any, y: torch.Tensor) -> torch.Tensor:
        try:
            return self.loss_fn(output, y)
        except (RuntimeError, TypeError, ValueError) as e:
            hint = (" (class labels must be integers: store them as int64)"
                    if y.is_floating_point() and getattr(output, "dim", lambda: 0)() == 2 and y.dim() == 1 else "")
            raise TypeError(f"loss_fn(output, target) failed on output {describe(output)} and target {describe(y)}"
                            f"{hint}: {str(e).splitlines()[0]}") from e

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = self.split(batch)
        return self.loss(model(x), y)


def checked_loss(loss: Any) -> torch.Tensor:
    """The step's loss, if it is a scalar tensor a backward can start from; else a TypeError that
    says what it got."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the step must return the loss as a scalar tensor, got {describe(loss)}")
    if loss.dim() != 0:
        raise TypeError(f"the loss must be a scalar (one number for the batch), got {describe(loss)}: "
                        f"reduce it (.mean()), or use a loss with reduction='mean'")
    return loss


def check_dataset(dataset: Any, field: str, step_fn: Callable | None, collate_fn: Callable | None = None) -> None:
    """In the driver, before any replica starts: the dataset has a length, its first items collate
    (by collate_fn, or else default_collate) and fit the step (pairs for loss_fn)."""
    try:
        size = len(dataset)
    except TypeError as e:
        raise ConfigError(field, f"{type(dataset).__name__} has no length and is no IterableDataset: give a "
                                 f"map-style Dataset (__len__ and __getitem__), or a torch.utils.data.IterableDataset "
                                 f"(__iter__) for data that is read rather than indexed") from e
    if size == 0:
        raise ConfigError(field, "is empty: a run needs at least one sample")
    items = [dataset[i] for i in range(min(2, size))]  # read once: an item may be costly to make
    if step_fn is None:
        try:
            SupervisedStep.split(items[0])
        except TypeError as e:
            raise ConfigError(field, f"items are {describe(items[0])}, not (input, target) pairs: give "
                                     f"step_fn(model, batch) -> loss instead of loss_fn") from e
    try:
        (collate_fn or default_collate)(items)
    except Exception as e:  # the user's collate (or torch's on the user's items): any error
        if collate_fn is not None:
            raise ConfigError("collate_fn", f"failed on the {field}'s first {len(items)} items: "
                                            f"{type(e).__name__}: {e}") from e
        raise ConfigError(field, f"its first {len(items)} items do not collate into a batch ({type(e).__name__}: "
                                 f"{e}): items of different shapes (sequences of different lengths) need "
                                 f"collate_fn(items) -> batch that pads them (--collate pkg.module:fn)") from e
