"""TrainConfig: every knob of a run, a docstring per field; its checks are checks.py's (values only), run at
creation."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..errors import ConfigError
from .checks import check

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["constant", "cosine", "step"]
DeviceName = Literal["cpu", "cuda", "auto"]
PrecisionName = Literal["fp32", "bf16", "fp16"]
ReductionName = Literal["auto", "shared_memory", "collective", "object_store"]
GradDtypeName = Literal["fp32", "bf16"]
PlacementName = Literal["pack", "spread"]
NonFiniteAction = Literal["stop", "skip"]
ErrorAction = Literal["retry", "stop"]
EvalMetric = Literal["eval_loss", "eval_accuracy"]
SplitName = Literal["even", "adaptive"]
InitName = Literal["default", "zeros"]
ShardName = Literal["none", "optimizer", "full"]


def run_defining(default: Any) -> Any:
    """A field that defines what a run computes: a resumed run must match its checkpoint in it. The
    others (workers, placement, devices, timeouts, ...) say how it is computed, and may change."""
    return dataclasses.field(default=default, metadata={"run_defining": True})


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One training run. The defaults reproduce the seed note's job on 2 replicas. Frozen: derive a
    changed one with dataclasses.replace (which validates it again)."""

    workers: int = 2
    """Number of Replica actors; each trains on its part of every global batch."""

    epochs: int = run_defining(10)
    """Passes over the training set."""

    batch_size: int = run_defining(100)
    """Global batch size: samples per optimizer step, summed over all replicas."""

    accumulate: int = run_defining(1)
    """Gradient accumulation: each optimizer step takes `accumulate` global batches of batch_size, and every replica runs its part in as many micro-batches, summing their gradients before the all-reduce (the same as one batch `accumulate` times larger)."""

    lr: float = run_defining(0.5)
    """Peak learning rate of the optimizer."""

    optimizer: OptimizerName = run_defining("adam")
    """torch.optim optimizer, with its default hyper-parameters except lr and weight_decay; or your own as pkg.module:fn, fn(model) returning a torch.optim.Optimizer (parameter groups welcome; it sets its own lr). The Python API also takes optimizer_fn."""

    lr_schedule: Optional[ScheduleName] = run_defining(None)
    """'cosine' decays lr to 0 over the run (one scheduler step per optimizer step); 'step' divides it by 10 at half and again at three quarters of the run; 'constant' keeps it; or your own as pkg.module:fn, fn(optimizer, total_steps) returning a scheduler stepped once per optimizer step. Default: constant, as PyTorch (the CLI's built-in datasets bring their recipe: cosine for the seed job)."""

    warmup_steps: int = run_defining(0)
    """Raise lr linearly from lr/N to lr over the first N steps, then follow lr_schedule over the rest."""

    weight_decay: float = run_defining(0.0)
    """The optimizer's weight decay (decoupled for adamw, L2 for sgd and adam, as torch.optim does)."""

    grad_clip: Optional[float] = run_defining(None)
    """Clip the all-reduced gradient to this global L2 norm before each step (the same on every replica)."""

    eval_every: int = run_defining(0)
    """Also evaluate every N steps (besides each epoch's end): a console line and an 'eval' record in metrics.jsonl; 0: epoch ends only."""

    early_stop_patience: int = run_defining(0)
    """Stop when early_stop_metric has not improved for this many evaluations in a row (epoch ends and eval_every); 0: never."""

    early_stop_metric: EvalMetric = run_defining("eval_loss")
    """What early stopping watches: 'eval_loss' (lower is better) or 'eval_accuracy' (higher, classifiers)."""

    max_steps: Optional[int] = run_defining(None)
    """Stop after this many optimizer steps, mid-epoch if need be (the last epoch's figures cover its steps run); the schedule spans them."""

    seed: int = run_defining(0)
    """Seeds the initial weights, the built-in data and the sample order of every epoch."""

    shuffle: bool = run_defining(True)
    """Draw a new sample order each epoch (a function of seed and epoch); off: dataset order."""

    drop_last: bool = run_defining(False)
    """Drop the last, partial global batch of each epoch."""

    init: InitName = run_defining("default")
    """Initial parameters: 'default' (the model's own initialization after torch.manual_seed(seed)) or 'zeros' (every parameter 0: the seed note's w = b = 0)."""

    sync_batchnorm: bool = run_defining(False)
    """BatchNorm over the whole global batch: each training forward's batch statistics are summed over the replicas (on the collective wire's process group, CPUs too), so a model with BatchNorm trains what one process trains on the same batches. Batches are then cut evenly (not adaptively) and every replica computes every step; off: each replica normalizes by its own part (results depend on W)."""

    model: Optional[str] = run_defining(None)
    """Model for the CLI: built-in 'linear' or 'mlp' (sized to the built-in dataset), or your own as pkg.module:factory (a zero-argument callable returning an nn.Module); default: the built-in dataset's ('linear' for linear, 'mlp' for the others). The Python API takes model_fn instead."""

    dataset: str = run_defining("linear")
    """Dataset for the CLI: built-in 'linear' (y = 2x + 1), 'classification' (16 features, 4 classes) or 'digits' (scikit-learn's 8x8 handwritten digits, 1,437 train / 360 eval), or your own as pkg.module:factory (returning a Dataset, or a (train, eval) pair)."""

    loss: Optional[str] = run_defining(None)
    """Loss for the CLI: a torch.nn loss class name (CrossEntropyLoss, MSELoss, ...) or pkg.module:function(output, target); default: the built-in dataset's."""

    step: Optional[str] = run_defining(None)
    """Your own step for the CLI, in place of loss: pkg.module:fn with fn(model, batch) returning the loss (a scalar tensor), for items that are not (input, target) pairs: dicts, nested, models that compute their own loss. batch is what the items collate to, on the replica's device. The Python API takes step_fn."""

    collate: Optional[str] = run_defining(None)
    """How a part's items become a batch, for the CLI: pkg.module:fn with fn(list of items) returning the batch (a padding collator for sequences of different lengths, Hugging Face's DataCollatorWithPadding wrapped in a function, ...); default: torch's default_collate. Each replica's part is weighted by its number of items, whatever the batch holds. The Python API takes collate_fn."""

    device: DeviceName = "cpu"
    """Where each replica computes: 'cpu', 'cuda' (one GPU, or gpus_per_replica of one, each), or 'auto' (cuda where the cluster has GPUs, else cpu)."""

    devices: Optional[str] = None
    """Per-replica devices instead of one for all: comma-separated, one per replica in rank order (e.g. 'cuda,cuda,cpu'), each 'cpu' or 'cuda' and reserving what its kind needs (cpus_per_replica; gpus_per_replica too for cuda). Mixed devices round differently (other kernels, cuDNN's TF32), so the run matches one process to float tolerance, not bit for bit; split 'adaptive' gives each replica the share it can carry. Not with spares."""

    precision: PrecisionName = run_defining("fp32")
    """Forward and loss under torch.autocast: 'fp32' (off), 'bf16', or 'fp16' with a loss scaler (torch.amp.GradScaler) whose skip-or-step decision every replica takes on the same all-reduced gradient, so replicas never diverge. Gradients and optimizer state stay fp32."""

    compile: bool = False
    """torch.compile each replica's model (inductor; compiled on the first steps, which run slower): the same math, to float tolerance."""

    loader_workers: int = 0
    """Threads per replica fetching the samples of its next steps while the current step computes (for a __getitem__ that reads or decodes); 0 fetches in the step itself. Random augmentation drawn from raytorch.sample_generator() is seeded per (seed, epoch, sample) in every thread; drawn from torch's global generator it is not (threads share it)."""

    cpus_per_replica: float = 1.0
    """CPUs Ray reserves for each replica; torch's intra-op threads follow it (at least 1)."""

    gpus_per_replica: Optional[float] = None
    """GPUs per replica with device 'cuda' (fractions share a GPU); default 1 for cuda, 0 for cpu."""

    split: SplitName = "adaptive"
    """How each global batch is cut among the replicas: 'adaptive' (parts sized by each replica's measured speed so that all finish a step together: a slow replica takes less and nobody waits for it; the update is the same, since each part's gradient is weighted by its samples), or 'even' (near-equal parts: the same cut points every run, so reruns agree bit for bit)."""

    placement: PlacementName = "pack"
    """How replicas are laid over nodes (Ray's placement-group strategy): 'pack' (as few nodes as hold them: locality, shared-memory gradients) or 'spread' (over distinct nodes where there are enough, best effort: a lost node takes fewer replicas with it)."""

    reduction: ReductionName = "auto"
    """How gradients travel between replicas: 'shared_memory' (all on one node: peers read each other's buffers in /dev/shm, reduce-scatter + all-gather), 'collective' (a torch.distributed group inside the replicas, ring all-reduce: gloo over host memory, any cluster; NCCL on the GPUs where every replica holds a whole GPU), 'object_store' (Ray objects routed by the driver, any cluster), 'auto' (collective with NCCL where every replica holds a whole GPU, else shared_memory where all replicas share a node, else collective with gloo; the console says which and why)."""

    grad_dtype: GradDtypeName = run_defining("fp32")
    """The gradient on the wire: 'fp32' (as backward computed it: the contract holds), or 'bf16' (rounded to bfloat16 for the all-reduce and summed in bfloat16, as DDP's bf16 compression hook does: half the bytes between nodes, but the run leaves the float contract: it matches one process to bfloat16's ~3 significant digits, not float32's; replicas still agree bit for bit). bf16 travels on the collective wire: 'auto' picks it."""

    shard: ShardName = run_defining("none")
    """What each replica holds whole: 'none' (the model, its gradient and the optimizer's state, on every replica; past two replicas on one node the shared-memory wire still shares one copy of the parameters and steps 1/W each: its sharded update), 'optimizer' (that sharded update asked for: the optimizer's state and step split over the replicas, ZeRO-1; on the shared-memory wire), 'full' (parameters, gradients and optimizer state split over the replicas by PyTorch's FSDP2, per block, on the collective wire's process group: gloo on CPUs, NCCL on GPUs; each block's parameters are gathered for its forward and backward and freed after; for models that outgrow one replica). The contract holds for each. With 'full' a replica holds the only copy of its shard: a lost replica stops the run, to resume from its last checkpoint."""

    shard_blocks: Optional[str] = None
    """With shard 'full', the units to shard, as pkg.module:fn with fn(model) returning its submodules, each gathered and freed as one (a transformer's blocks); default: the children of the model's largest nn.ModuleList or nn.Sequential, else its direct children. The Python API takes shard_blocks_fn."""

    address: Optional[str] = None
    """Ray cluster to join ('auto', 'host:port', 'ray://host:port'); default RAY_ADDRESS, else a local Ray on 127.0.0.1."""

    resource_timeout: Optional[float] = None
    """Seconds to wait for a busy cluster to make room for the replicas: default 60, or 600 where an autoscaler can add nodes. A request the cluster can never hold fails at once unless an autoscaler can add nodes."""

    output_dir: Optional[str] = None
    """Run directory for the resolved config, metrics.jsonl, checkpoints and the final model.pt; nothing is written without it. A local path, or an fsspec URL: s3://bucket/path (pip install 'raytorch[s3]'; credentials and AWS_ENDPOINT_URL from the environment), gs://bucket/path (gcsfs), file:///abs/path. A remote run directory's files are staged in a local directory and uploaded at each checkpoint and at the end; its checkpoints are written to it directly."""

    overwrite: bool = False
    """A fresh run into an output_dir that holds another run's files (config.yaml, metrics.jsonl, checkpoints, the model, ...) removes them first; without it such a run is refused at once (continue that run with --resume instead). Other files there are left alone."""

    log_every: int = 10
    """With output_dir: a per-step record (loss, samples/s) in metrics.jsonl every N steps, besides the per-epoch ones; 0: epoch records only."""

    tensorboard: bool = False
    """With output_dir: also write TensorBoard event files to output_dir/tensorboard (needs the tensorboard package: pip install 'raytorch[tensorboard]')."""

    callbacks: Optional[str] = None
    """Callbacks that get the run's records, comma-separated: 'mlflow' (MLflow: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), 'wandb' (Weights & Biases: WANDB_PROJECT, WANDB_MODE, ...), or your own as pkg.module:Class, a raytorch.Callback made with no arguments. The Python API also takes callbacks=[...] objects."""

    checkpoint_every: int = 0
    """With output_dir: also checkpoint every N steps (a checkpoint is always written at each epoch's end); 0: epoch ends only."""

    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep in output_dir/checkpoints."""

    profile_steps: Optional[str] = None
    """With output_dir: profile global steps A:B (A included, B not, e.g. 5:10) on every replica: a torch.profiler trace per replica in output_dir/profile/replica-<rank>.json (Perfetto, chrome://tracing), and at the end a console line per replica with its mean ms per step of fetch, forward+backward, all-reduce wait and optimizer step (TrainResult.profile)."""

    spares: int = 0
    """Idle replicas started with the run, each reserving what a replica does, that take a lost replica's place at once: recovery without a new process's start (seconds here). A used spare is replaced in the background."""

    replace_timeout: float = 60.0
    """Seconds to wait for a lost replica's replacement to start; after that the run goes on with fewer replicas (the result does not depend on their number)."""

    min_workers: int = 1
    """Fewest replicas the run goes on with after losses it cannot replace; below it the run stops with a checkpoint."""

    max_workers: Optional[int] = None
    """Elastic runs: most replicas. The run starts with as many as fit now (at least workers) and takes in more where room appears mid-run (a node joins, the autoscaler adds one, a lost replica's resources return), between steps, each starting from a live replica's state: the result is the same at any size. The CLI's --workers MIN:MAX sets workers and min_workers to MIN and this to MAX. Default: no growth."""

    step_timeout: float = 300.0
    """A replica that spends longer than this on one step, or stops answering for as long, is treated as dead and replaced; one that times out 3 times is not replaced again (the run goes on without it at min_workers or above, else stops)."""

    on_error: ErrorAction = "retry"
    """An exception raised inside a replica: 'retry' ends that replica and redoes its step on a replacement from the other replicas' state, once (the same step failing again stops the run); 'stop' ends the run at once. Either way the message names the replica, the step and the resume command."""

    on_nonfinite: NonFiniteAction = run_defining("stop")
    """NaN or inf in a step's loss or gradient: 'stop' the run naming the step and replica (checkpoints stay as they were), or 'skip' that step's update on every replica."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what to do about it (checks.py)."""
        check(self)

    @property
    def profile_range(self) -> Optional[tuple[int, int]]:
        """The profiled global steps [A, B) of profile_steps 'A:B', or None."""
        if self.profile_steps is None:
            return None
        first, _, end = self.profile_steps.partition(":")
        return int(first), int(end)

    @property
    def step_batch(self) -> int:
        """Samples per optimizer step: batch_size x accumulate."""
        return self.batch_size * self.accumulate

    @property
    def schedule(self) -> str:
        """The learning-rate schedule in effect."""
        return self.lr_schedule or "constant"

    @property
    def device_names(self) -> list[str]:
        """Each replica's device, in rank order: devices, or device for all."""
        if self.devices is not None:
            return [name.strip() for name in self.devices.split(",")]
        return [self.device] * self.workers

    @property
    def mixed_devices(self) -> bool:
        return len(set(self.device_names)) > 1

    def device_of(self, rank: int) -> str:
        """Replica `rank`'s device (a spare's too: spares exist only with one device for all)."""
        return self.device_names[rank] if self.devices is not None else self.device

    def gpus_of(self, rank: int) -> float:
        """GPUs replica `rank` reserves."""
        device = self.device_of(rank)
        if device == "auto":
            raise ValueError("device 'auto' is resolved against the cluster first (see device.resolve_device)")
        if device == "cpu":
            return 0.0
        return 1.0 if self.gpus_per_replica is None else self.gpus_per_replica

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build a config from a mapping, rejecting keys that are not fields."""
        if not isinstance(values, dict):
            raise ConfigError(source, f"must be a mapping of field: value, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(source, f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Load a YAML file of field: value pairs; overrides (e.g. from CLI flags) win."""
        return cls.from_dict({**read_yaml(path), **overrides}, source=f"config {path}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's field: value pairs, or a ConfigError saying what is wrong with it."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from e
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError("config", f"{path} must be a mapping of field: value, got a {type(values).__name__}")
    return values


RUN_DEFINING = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("run_defining"))
"""The run-defining fields (see run_defining), in declaration order."""


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_choices(name: str, cls: type = TrainConfig) -> tuple | None:
    """The allowed values of a Literal-typed field, or None."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is typing.Union:  # Optional[X]: look at X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None
