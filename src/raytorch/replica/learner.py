"""Learner: one replica's PyTorch half. The model on its device, its flat gradient, optimizer,
schedule and loss scaler: computes the gradient of a part of a batch, applies an all-reduced
gradient, evaluates, and takes or loads a snapshot. Plain PyTorch: no Ray, no wire, no rank.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config.schema import TrainConfig
from ..core.sharding import steps_per_epoch
from ..core.snapshot import Snapshot
from ..data.datasets import Prefetcher, fetch
from .batches import SupervisedStep, checked_loss, describe, pin_memory, to_device
from .device import autocast
from .optim import make_optimizer, make_schedule
from .profiler import StepProfiler
from .syncbn import GlobalBatchNorm, convert

# Elements of a gradient copied and summed at a time (512 KiB of float32: stays in a core's cache),
# so checking it costs no second read from memory (a 67 MB gradient: 17.9 -> 12.3 ms, one thread).
GATHER_PIECE = 1 << 17

# Below this many gradient elements per parameter (on average), backward accumulates into .grad
# views of the zeroed flat buffer instead of fresh gradients gathered by hooks (FlatGradient.
# in_place): there a hook's few tensor operations per parameter cost more than the passes over the
# gradient they save. One replica in one process, us a step, hooks vs in place: the seed's linear
# model (1 element a parameter) ~460 vs ~350; MLPs of 289, 3.2 K, 11.9 K elements a parameter
# 740-1230 vs 630-1040, ~1360 vs ~1120, ~1660 vs ~1470; 45.6 K even (~3000); 179 K and 707 K: hooks
# ~10% faster.
IN_PLACE_PER_PARAM = 1 << 15


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running means and variances of `model` (the buffers its training forward
    updates from the batch), in module order."""
    return [buffer for m in model.modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm) and m.track_running_stats
            for buffer in (m.running_mean, m.running_var) if buffer is not None]


def attach_flat_grad(model: nn.Module, spare: int = 0) -> torch.Tensor:
    """Give every trainable parameter a .grad that is a view into one contiguous buffer.

    The optimizer then reads the all-reduced gradient from the buffer, and one step hands over one
    array (Learner.gradient gathers backward's gradients into it). The buffer is of the widest
    parameter dtype, at least float32 (16-bit gradients are summed in float32); a parameter of a
    narrower dtype gets a .grad of its own instead of a view, filled from the buffer (FlatGradient.
    scatter). The buffer's storage holds `spare` elements more after the gradient (see with_spare).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: nothing to train")
    dtype = functools.reduce(torch.promote_types, {p.dtype for p in params}, torch.float32)
    numel = sum(p.numel() for p in params)
    stats = sum(b.numel() for b in running_statistics(model))  # after the gradient: see FlatGradient
    flat = torch.zeros(numel + stats + spare, dtype=dtype, device=params[0].device)[:numel + stats]
    point_grads(params, flat, {i: torch.zeros_like(p) for i, p in enumerate(params) if p.dtype != dtype})
    return flat


def point_grads(params: list[nn.Parameter], flat: torch.Tensor, narrow: dict[int, torch.Tensor]) -> None:
    """Make each parameter's .grad its view of `flat` (parameters in order, back to back), or
    narrow[index] for a parameter of another dtype than flat's."""
    offset = 0
    for index, p in enumerate(params):
        p.grad = narrow[index] if index in narrow else flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the parameters' and buffers' bytes: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for t in model.state_dict().values():  # parameters and buffers (BatchNorm's statistics)
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.hexdigest()


def with_spare(flat: torch.Tensor, spare: int) -> torch.Tensor:
    """`flat` and the `spare` elements after it in its storage, as one tensor (a view: no copy)."""
    return flat.new_empty(0).set_(flat.untyped_storage(), flat.storage_offset(), (flat.numel() + spare,))


class FlatGradient:
    """A model's trainable parameters' gradients in one contiguous buffer, `flat`, whose views are
    the parameters' .grad (where the optimizer reads the all-reduced gradient). Backward runs into
    fresh gradients, and a hook gathers each into a flat buffer as soon as it is final: cheaper than
    zeroing the buffer and accumulating into it (one pass over the gradient instead of three), and
    the buffer can be the wire's own (the shared-memory wire's, read by the peers; the collective
    wire reduces a bucket as soon as it is full: `on_ready`).

    The rule for BatchNorm: its running means and variances travel after the gradient, in the same
    buffer, weighted like the gradients (n_r / n), and every replica takes the all-reduced values:
    the replicas' buffers never diverge. The running mean is then the one one process computes
    (its update is linear in the batch mean); the running variance leaves out the spread between
    the parts' means, and each replica normalizes with its own part's batch statistics, so a model
    with BatchNorm trains something that depends on W (the console says so at start).

    Small parameters (`in_place`: below IN_PLACE_PER_PARAM elements each, on average, all of
    flat's dtype) keep the old way: the .grad views of flat stay, flat is zeroed, backward
    accumulates into it, and the gradient is checked and copied out once, after backward."""

    def __init__(self, model: nn.Module, device: torch.device, check: bool = True):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats = running_statistics(model)
        self.flat = attach_flat_grad(model, spare=1)
        # parameters of a narrower dtype than flat's (bf16 beside fp32): their .grad is their own
        self.narrow = {i: p.grad for i, p in enumerate(self.params) if p.dtype != self.flat.dtype}
        bounds = np.cumsum([0] + [p.numel() for p in self.params] + [sum(b.numel() for b in self.stats)])
        # each parameter's place in flat, and the running statistics' (one entry more, where any)
        self.bounds = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))[:len(self.params) + bool(self.stats)]
        self.in_place = not self.narrow and self.flat.numel() < IN_PLACE_PER_PARAM * len(self.params)
        self.views = [p.grad for p in self.params]  # in place: the .grad backward accumulates into
        for index, p in enumerate(self.params):
            if not self.in_place:
                p.register_post_accumulate_grad_hook(functools.partial(self._filled, index))
        self.check = check  # sum the gradients as they come (NaN and inf propagate through a sum)
        # while backward runs for the last micro-batch: where gradients are gathered, and which came
        self.gathered: Optional[torch.Tensor] = None
        self.filled: set[int] = set()
        self.checksum = torch.zeros((), device=device)
        # called with a parameter's index once its gradient of the step is gathered (a wire can
        # start reducing it while backward goes on)
        self.on_ready: Optional[Callable[[int], None]] = None

    def release(self) -> None:
        """A new gradient begins: backward makes fresh tensors (the views in flat let go), or, in
        place, accumulates into the zeroed views (pointed at flat again if anything replaced them)."""
        self.filled.clear()
        if self.in_place:
            if any(p.grad is not view for p, view in zip(self.params, self.views)):
                point_grads(self.params, self.flat, self.narrow)
                self.views = [p.grad for p in self.params]
            self.flat.zero_()
            return
        for p in self.params:
            p.grad = None
        self.checksum.zero_()

    def gather_into(self, out: Optional[torch.Tensor]) -> None:
        """The next backward's gradients, as each is final, go into `out` (None: they accumulate)."""
        self.gathered = out

    def put_statistics(self, out: torch.Tensor, weight: float) -> None:
        """After the last forward: the running statistics, times `weight`, into their place in `out`."""
        if self.stats:
            lo, hi = self.bounds[-1]
            out[lo:hi].copy_(torch.cat([b.reshape(-1) for b in self.stats]).mul_(weight))
            self._ready(len(self.params))

    def take_statistics(self) -> None:
        """The all-reduced running statistics in flat into the model's buffers."""
        if self.stats:
            offset = self.bounds[-1][0]
            for buffer in self.stats:
                buffer.copy_(self.flat[offset:offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()

    def complete(self, out: torch.Tensor) -> None:
        """After the last backward: zeros in `out` for the parameters it did not reach, and every
        .grad a view of flat again."""
        self.gathered = None
        if self.in_place:  # the gradient is in flat: checked, copied out (not the statistics: in `out`)
            end = self.bounds[len(self.params) - 1][1]
            if self.check:
                self.checksum = self.flat[:end].sum()
            if out is not self.flat:
                out[:end].copy_(self.flat[:end])
            for index in range(len(self.params)):
                self._ready(index)
            return
        for index in range(len(self.bounds)):
            if index not in self.filled:
                lo, hi = self.bounds[index]
                out[lo:hi].zero_()
                self._ready(index)
        point_grads(self.params, self.flat, self.narrow)

    def scatter(self) -> None:
        """The (all-reduced) gradient in flat into the narrower parameters' own .grad."""
        for index, grad in self.narrow.items():
            lo, hi = self.bounds[index]
            grad.copy_(self.flat[lo:hi].view_as(grad))

    def _filled(self, index: int, param: nn.Parameter) -> None:
        """Backward's hook: parameter `index` has its final gradient of this backward."""
        if self.gathered is None:
            return
        lo, hi = self.bounds[index]
        fresh = param.grad.reshape(-1)
        if not self.check:
            self.gathered[lo:hi].copy_(fresh)
        else:
            for start in range(0, hi - lo, GATHER_PIECE):  # each piece summed while in cache
                piece = self.gathered[lo + start:min(hi, lo + start + GATHER_PIECE)]
                piece.copy_(fresh[start:start + len(piece)])
                self.checksum += piece.sum()
        param.grad = None  # freed now, not at the end of backward
        self._ready(index)

    def _ready(self, index: int) -> None:
        self.filled.add(index)
        if self.on_ready is not None:
            self.on_ready(index)


def host_buffers(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the gradient is all-reduced on the host: (host_buffer, staging). On CPU both are the
    flat gradient itself. On a GPU, gradients cross to the host through pinned buffers (copies
    that do not block the host): `staging` takes this replica's gradient out; the reduced one comes
    back in `host_buffer`, which has one element more, where a collective carries the loss."""
    if flat.device.type == "cpu":
        return with_spare(flat, 1), flat
    return (torch.empty(flat.numel() + 1, dtype=flat.dtype, pin_memory=True),
            torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True))


class Learner:
    """The model, optimizer, schedule and loss scaler of one replica, on `device`."""

    def __init__(self, config: TrainConfig, device: torch.device, model_fn: Callable[[], nn.Module],
                 loss_fn: Optional[Callable], init_state: dict, train_set, eval_set, total_steps: int, *,
                 step_fn: Optional[Callable] = None, optimizer_fn: Optional[Callable] = None,
                 schedule_fn: Optional[Callable] = None):
        """step_fn(model, batch) -> loss, or else loss_fn(model(x), y) on (x, y) batches;
        optimizer_fn(model) and schedule_fn(optimizer, total_steps), or else config's by name."""
        self.device = device
        model = model_fn()  # with sync_batchnorm, its BatchNorms normalize over the global batch: syncbn.py
        self.model = (convert(model) if config.sync_batchnorm else model).to(self.device)
        self.model.load_state_dict(init_state)
        # what forward runs: the model, or its compiled form (same parameters, same state_dict)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.supervised = SupervisedStep(loss_fn) if step_fn is None else None
        self.step = step_fn or self.supervised
        self.train_set, self.eval_set = train_set, eval_set
        per_epoch = steps_per_epoch(len(train_set), config.step_batch, config.drop_last)
        self.key = lambda step: (config.seed, step // per_epoch)  # seeds a step's augmentation: augment.py
        pin = pin_memory if device.type == "cuda" else None  # copies to the GPU without blocking
        self.loader = Prefetcher(config.loader_workers, pin) if config.loader_workers else None
        self.grads = FlatGradient(self.model, self.device, check=config.precision != "fp16")
        self.flat_grad = self.grads.flat
        self.host_buffer, self.staging = host_buffers(self.flat_grad)
        self.host_grad = self.staging if self.device.type == "cpu" else self.host_buffer[:self.flat_grad.numel()]
        self.optimizer = (optimizer_fn(self.model) if optimizer_fn is not None else
                          make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.weight_decay))
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_fn(model) must return a torch.optim.Optimizer, got {describe(self.optimizer)}")
        self.grad_clip, self.accumulate = config.grad_clip, config.accumulate
        self.precision = config.precision
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        if self.scaler is not None:
            self.scaler.scale(torch.ones((), device=self.device))  # creates its scale now: a replica may sit out step 0
        self.schedule = (schedule_fn(self.optimizer, total_steps) if schedule_fn is not None else
                         make_schedule(config.schedule, self.optimizer, total_steps, config.warmup_steps))
        # A skipped update (fp16 overflow, on_nonfinite 'skip') still steps the schedule, on purpose:
        # PyTorch's warning about a schedule step without an optimizer step does not apply.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        # backward of this replica's share of the global mean loss (n_r / n times its part's mean),
        # so the gradient comes weighted: a collective then sums it as it is
        self.prescaled = False
        self.computing_since: Optional[float] = None  # set while a forward and backward run
        self.compute_s = 0.0  # the last gradient's forward and backward (and its check)
        self.profiler = StepProfiler(config.profile_range, device)  # times each step's phases; traces profile_steps

    def reduce_on_device(self) -> None:
        """All-reduce on the device (NCCL): the "host" buffers become the flat gradient itself."""
        self.host_grad = self.staging = self.flat_grad
        self.host_buffer = with_spare(self.flat_grad, 1)

    def gradient(self, indices: np.ndarray, share: float, into: Optional[torch.Tensor] = None, step: int = 0
                 ) -> tuple[float, Optional[str]]:
        """The gradient of global step `step`'s mean loss over the samples at `indices` (a part of
        `share` of the batch), flat, into `into` (a host buffer of the wire's) or else `staging`. Returns
        the local mean loss and what of it or the gradient is not finite (None where both are)."""
        self.computing_since = time.monotonic()
        self.profiler.from_step(step)
        # backward into fresh gradients, each gathered as soon as it is final (FlatGradient)
        out = self.staging if into is None else into
        on_device = self.staging is not self.flat_grad
        self.grads.release()
        value = 0.0
        # accumulate > 1: the part in micro-batches, each weighted by its share of the part, so the
        # summed gradient is the part's mean-loss gradient, as one pass would give
        micros = self.micro_batches(indices)
        gathered = self.flat_grad if on_device else out
        for k, micro in enumerate(micros):
            last = k == len(micros) - 1
            # the last micro-batch's backward gathers each gradient as it is final
            self.grads.gather_into(gathered if last else None)
            with self.profiler.phase("fetch", step):
                batch = to_device((self.loader.get if self.loader else fetch)(self.train_set, micro, self.key(step)),
                                  self.device)
            with self.profiler.phase("forward_backward", step):
                with autocast(self.device, self.precision):
                    loss = checked_loss(self.step(self.forward, batch)) * (len(micro) / len(indices))
                if last:  # BatchNorm's running statistics are final: weighted as the gradient will come
                    self.grads.put_statistics(gathered, share if self.prescaled or self.scaler is not None else 1.0)
                if self.scaler is None:
                    (loss * share if self.prescaled else loss).backward()
                else:
                    # fp16: backward of this replica's part of the global mean loss, times the loss scale,
                    # so its fp16 gradients have the magnitudes one process's would (and overflow alike);
                    # the all-reduce is then a plain sum, unscaled by the scaler (see update)
                    (self.scaler.scale(loss) * share).backward()
                value += loss.item()  # waits for the device: its time is the phase's
        self.grads.complete(gathered)
        what = self._nonfinite(value)
        self.compute_s = time.monotonic() - self.computing_since  # before any wait for peers
        self.computing_since = None
        if on_device:
            out.copy_(self.flat_grad, non_blocking=True)
            # also orders any earlier host-to-device copy of host_grad before it is written again
            torch.cuda.current_stream(self.device).synchronize()
        return value, what

    def micro_batches(self, indices: np.ndarray) -> list[np.ndarray]:
        """A part's micro-batches (accumulate > 1), each of near-equal size."""
        return [indices] if self.accumulate == 1 else np.array_split(indices, min(self.accumulate, len(indices)))

    def ahead(self, indices: np.ndarray, step: int) -> None:
        """The samples at `indices` come next, in global step `step`: fetch them in the background
        (loader_workers)."""
        if self.loader is not None and len(indices):
            for micro in self.micro_batches(indices):
                self.loader.ahead(self.train_set, micro, self.key(step))

    def _nonfinite(self, loss: float) -> Optional[str]:
        """What is not finite: the loss, the gradient, or nothing (None)."""
        # One sum over the gradient, taken as it was gathered: NaN and inf propagate through a sum
        # (it also flags a gradient whose sum overflows float32: a run that far gone has diverged).
        # With fp16 an overflowing gradient is the loss scaler's business: it skips that step.
        return (f"loss {loss}" if not math.isfinite(loss)
                else None if self.scaler is not None or torch.isfinite(self.grads.checksum)
                else "gradient with NaN or inf")

    def update(self, finite: bool, step: int, shard: Optional[Callable[[bool], None]] = None) -> None:
        """Step with the all-reduced gradient of global step `step` in host_grad, or by `shard`
        (a sharded update: zero.py); with `finite` false (on_nonfinite 'skip'), drop the update.
        The schedule steps either way."""
        with self.profiler.phase("optimizer", step):
            if self.host_grad is not self.flat_grad:
                self.flat_grad.copy_(self.host_grad, non_blocking=True)
            self.grads.take_statistics()  # as one process's forward updated them, skipped step or not
            if shard is not None:
                shard(finite)
            elif finite:  # the same test on the same numbers: every replica decides alike
                self.grads.scatter()
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)  # the true gradient, for clipping and the overflow check
                if self.grad_clip is not None:  # on the reduced gradient: the same on every replica
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                if self.scaler is None:
                    self.optimizer.step()
                else:  # step unless the (same, everywhere) reduced gradient overflowed; adapt the scale
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
            self.schedule.step()
        self.profiler.applied(step)

    def evaluate(self, indices: np.ndarray, chunk: int) -> tuple[float | None, float | None]:
        """Mean loss over the eval samples at `indices`, in chunks of `chunk`, and, for a classifier
        (outputs of shape (n, classes) against integer labels), the fraction classified right.
        (None, None) where there are no samples."""
        if len(indices) == 0:
            return None, None
        self.model.eval()
        total, correct, classifier = 0.0, 0, True
        with torch.no_grad(), autocast(self.device, self.precision):
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                batch = to_device(fetch(self.eval_set, part), self.device)
                if self.supervised is None:  # the user's step: its loss, no accuracy
                    total += checked_loss(self.step(self.forward, batch)).item() * len(part)
                    classifier = False
                    continue
                x, y = self.supervised.split(batch)
                output = self.forward(x)
                total += checked_loss(self.supervised.loss(output, y)).item() * len(part)
                classifier = classifier and output.dim() == 2 and output.shape[1] > 1 and not y.is_floating_point()
                if classifier:
                    correct += (output.argmax(dim=1) == y).sum().item()
        self.model.train()
        return total / len(indices), (correct / len(indices) if classifier else None)

    def snapshot(self, steps: int, losses: dict[int, float]) -> Snapshot:
        """This state after `steps` updates, with the given losses of applied steps."""
        return Snapshot(model=self.state(), optimizer=self.optimizer.state_dict(),
                        schedule=self.schedule.state_dict(), rng=torch.get_rng_state(),
                        scaler=self.scaler.state_dict() if self.scaler is not None else None,
                        steps=steps, losses=losses)

    def restore(self, snapshot: Snapshot) -> None:
        if self.loader is not None:
            self.loader.clear()  # fetched ahead for steps this state may not take next
        self.model.load_state_dict(snapshot.model)
        self.optimizer.load_state_dict(snapshot.optimizer)
        self.schedule.load_state_dict(snapshot.schedule)
        torch.set_rng_state(snapshot.rng)
        if self.scaler is not None and snapshot.scaler:
            self.scaler.load_state_dict(snapshot.scaler)
        self.profiler.from_step(snapshot.steps)  # the steps from there on run again

    def memory(self) -> dict[str, int]:
        """Bytes of the parameters, the flat gradient and the optimizer's state."""
        return {
            "params": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "grad": self.flat_grad.numel() * self.flat_grad.element_size(),
            "optimizer": sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                             for t in state.values() if torch.is_tensor(t)),
        }

    def state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict, on CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def digest(self) -> str:
        return state_digest(self.model)
