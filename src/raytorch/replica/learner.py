"""Learner: one replica's PyTorch half. The model on its device, its flat gradient (flatgrad.py),
optimizer, schedule and loss scaler: computes the gradient of a part of a batch, applies an all-reduced
gradient, evaluates, and takes or loads a snapshot. Plain PyTorch: no Ray, no wire, no rank.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config.schema import TrainConfig
from ..core.sharding import steps_per_epoch
from ..core.snapshot import Snapshot, compact, digest
from ..data.datasets import Prefetcher, fetch
from ..errors import ConfigError
from . import fsdp
from .batches import SupervisedStep, checked_loss, describe, pin_memory, to_device
from .device import autocast
from .draws import ForwardDraws
from .evaluation import STAND_IN, evaluate
from .flatgrad import FlatGradient, host_buffers, with_spare
from .optim import make_optimizer, make_schedule
from .profiler import StepProfiler
from .syncbn import convert


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the parameters' and buffers' bytes: equal digests mean bit-identical replicas."""
    return digest(model.state_dict().values())  # parameters and buffers (BatchNorm's statistics)


def load_initial(model: nn.Module, init_state: dict) -> None:
    """The driver's initial state into this replica's model: a ConfigError in one line where the
    model is not the one the driver built (a model_fn that builds differently per process)."""
    try:
        model.load_state_dict(init_state)
    except RuntimeError as e:
        what = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ConfigError("model_fn", f"built a different model in this replica than in the driver ({what}): make "
                                      f"it deterministic, the same parameters in every process") from e


class WholeState:
    """A replica's state where it holds the whole model: its model's and optimizer's state_dicts,
    each tensor in a storage of its own (compact: under a sharded update they view shared buffers)."""

    @staticmethod
    def model(model: nn.Module) -> dict[str, torch.Tensor]:
        return compact({k: v.detach().cpu() for k, v in model.state_dict().items()})

    @staticmethod
    def optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return compact(optimizer.state_dict())

    @staticmethod
    def load(model: nn.Module, optimizer: torch.optim.Optimizer, snapshot: Snapshot) -> None:
        model.load_state_dict(snapshot.model)
        optimizer.load_state_dict(snapshot.optimizer)

    digest = staticmethod(state_digest)


class Learner:
    """The model, optimizer, schedule and loss scaler of one replica, on `device`."""

    def __init__(self, config: TrainConfig, device: torch.device, model_fn: Callable[[], nn.Module],
                 loss_fn: Optional[Callable], init_state: dict, train_set, eval_set, total_steps: int, *,
                 step_fn: Optional[Callable] = None, optimizer_fn: Optional[Callable] = None,
                 schedule_fn: Optional[Callable] = None, collate_fn: Optional[Callable] = None,
                 blocks_fn: Optional[Callable] = None):
        """step_fn(model, batch) -> loss, or else loss_fn(model(x), y) on (x, y) batches;
        optimizer_fn(model) and schedule_fn(optimizer, total_steps), or else config's by name;
        collate_fn(items) -> batch, or else default_collate; blocks_fn(model) -> the units shard
        'full' shards (fsdp.default_blocks otherwise)."""
        self.device = device
        # seeded as the driver's: whatever model_fn draws beyond its state_dict (a non-persistent
        # buffer, random features) is what the driver's model holds, in every replica
        torch.manual_seed(config.seed)
        model = model_fn()  # with sync_batchnorm, its BatchNorms normalize over the global batch: syncbn.py
        self.model = (convert(model) if config.sync_batchnorm else model).to(self.device)
        load_initial(self.model, init_state)
        # what forward runs: the model, or its compiled form (same parameters, same state_dict)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.supervised = SupervisedStep(loss_fn) if step_fn is None else None
        self.step = step_fn or self.supervised
        self.train_set, self.eval_set = train_set, eval_set
        per_epoch = steps_per_epoch(len(train_set), config.step_batch, config.drop_last)
        self.key = lambda step: (config.seed, step // per_epoch)  # seeds a step's augmentation: augment.py
        self.draws = ForwardDraws(config.seed)  # and, with step and samples, each forward's dropout
        pin = pin_memory if device.type == "cuda" else None  # copies to the GPU without blocking
        self.collate = collate_fn
        self.loader = Prefetcher(config.loader_workers, pin, collate_fn) if config.loader_workers else None
        # fully sharded, FSDP2's shards take the gradient once the group is joined: no model-sized buffer
        self.grads = (fsdp.ShardedGradient(self.model, self.device) if config.shard == "full" else
                      FlatGradient(self.model, self.device, check=config.precision != "fp16"))
        self.flat_grad = self.grads.flat
        self.host_buffer, self.staging = host_buffers(self.flat_grad)
        self.host_grad = self.staging if self.device.type == "cpu" else self.host_buffer[:self.flat_grad.numel()]
        self.make_optimizer = lambda: self._optimizer(config, optimizer_fn, schedule_fn, total_steps)
        self.make_optimizer()
        self.shard, self.blocks_fn = config.shard, blocks_fn
        self.states = WholeState  # how its state is taken and loaded
        self.full = False  # fully sharded (shard_fully): FSDP2 holds this replica's shard of everything
        self.grad_clip, self.accumulate = config.grad_clip, config.accumulate
        self.precision = config.precision
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        if self.scaler is not None:
            self.scaler.scale(torch.ones((), device=self.device))  # creates its scale now: a replica may sit out step 0
        # A skipped update (fp16 overflow, on_nonfinite 'skip') still steps the schedule, on purpose:
        # PyTorch's warning about a schedule step without an optimizer step does not apply.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        # backward of this replica's share of the global mean loss (n_r / n times its part's mean),
        # so the gradient comes weighted: a collective then sums it as it is
        self.prescaled = False
        self.computing_since: Optional[float] = None  # set while a forward and backward run
        self.compute_s = 0.0  # the last gradient's forward and backward (and its check)
        self.profiler = StepProfiler(config.profile_range, device)  # times each step's phases; traces profile_steps

    def _optimizer(self, config: TrainConfig, optimizer_fn, schedule_fn, total_steps: int) -> None:
        """The optimizer and schedule over the model's parameters as they are now."""
        self.optimizer = (optimizer_fn(self.model) if optimizer_fn is not None else
                          make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.weight_decay))
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_fn(model) must return a torch.optim.Optimizer, got {describe(self.optimizer)}")
        self.schedule = (schedule_fn(self.optimizer, total_steps) if schedule_fn is not None else
                         make_schedule(config.schedule, self.optimizer, total_steps, config.warmup_steps))

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
            # fully sharded, a replica without samples takes part with sample 0, weighted 0 (FSDP2's
            # all-gathers and reduce-scatters need every replica in every forward and backward)
            weight, micro = (len(micro) / len(indices), micro) if len(micro) else (0.0, STAND_IN)
            with self.profiler.phase("fetch", step):
                batch = to_device(self.loader.get(self.train_set, micro, self.key(step)) if self.loader
                                  else fetch(self.train_set, micro, self.key(step), self.collate),
                                  self.device)
            with self.profiler.phase("forward_backward", step):
                with autocast(self.device, self.precision), self.draws.forward(step, micro):
                    loss = checked_loss(self.step(self.forward, batch)) * weight
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
        """A part's micro-batches (accumulate > 1), each of near-equal size (fully sharded: always
        `accumulate`, empty ones standing in for samples this replica lacks)."""
        if self.full:  # every replica runs as many (FSDP2's collectives pair up): some may be empty
            return np.array_split(indices, self.accumulate)
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
        (a sharded update: wire/sharded.py); with `finite` false (on_nonfinite 'skip'), drop the update.
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

    def evaluate(self, indices: np.ndarray, chunk: int, rounds: int = 0) -> tuple[float | None, float | None]:
        """Mean loss (and a classifier's accuracy) over the eval samples at `indices`: evaluation.py."""
        return evaluate(self, indices, chunk, rounds if self.full else 0)

    def snapshot(self, steps: int, losses: dict[int, float]) -> Snapshot:
        """This state after `steps` updates, with the given losses of applied steps."""
        return Snapshot(model=self.state(), optimizer=self.states.optimizer(self.model, self.optimizer),
                        schedule=self.schedule.state_dict(), rng=torch.get_rng_state(),
                        scaler=self.scaler.state_dict() if self.scaler is not None else None,
                        steps=steps, losses=losses)

    def restore(self, snapshot: Snapshot) -> None:
        if self.loader is not None:
            self.loader.clear()  # fetched ahead for steps this state may not take next
        self.states.load(self.model, self.optimizer, snapshot)
        self.schedule.load_state_dict(snapshot.schedule)
        torch.set_rng_state(snapshot.rng)
        if self.scaler is not None and snapshot.scaler:
            self.scaler.load_state_dict(snapshot.scaler)
        self.profiler.from_step(snapshot.steps)  # the steps from there on run again

    def memory(self) -> dict[str, int]:
        """Bytes this replica holds of the parameters, the gradient and the optimizer's state."""
        grads = [p.grad for p in self.grads.params] if self.full else [self.flat_grad]
        return {"params": fsdp.nbytes(self.model.parameters()), "grad": fsdp.nbytes(grads),
                "optimizer": fsdp.nbytes(t for state in self.optimizer.state.values() for t in state.values())}

    def state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict, on CPU (WholeState; fully sharded, fsdp.ShardedState)."""
        return self.states.model(self.model)

    def digest(self) -> str:
        return self.states.digest(self.model)
