"""The console's lines: an epoch's (the seed note's), the final loss, the run's summary, why a
split is uneven, the restarts, the defaults your own model trains with; and the seed's linear
model read as its w and b."""

from __future__ import annotations

from typing import Collection, Mapping, Optional

import torch

from ..config.imports import is_import_path
from ..config.schema import TrainConfig
from ..core.naming import replica_name


def is_scalar_linear(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a 1 -> 1 linear model: one weight and one bias of one element each."""
    return (len(state) == 2 and all(t.numel() == 1 for t in state.values())
            and sorted(k.rsplit(".", 1)[-1] for k in state) == ["bias", "weight"])


def scalar_linear_values(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The linear model's {"w": weight, "b": bias} (see is_scalar_linear)."""
    values = {k.rsplit(".", 1)[-1]: t.item() for k, t in state.items()}
    return {"w": values["weight"], "b": values["bias"]}


def epoch_line(epoch: int, loss: float, wb: Optional[tuple[float, float]] = None,
               eval_loss: Optional[float] = None, accuracy: Optional[float] = None) -> str:
    """'Epoch 0: loss=5.941978 (w=2.011, b=0.402)' for the linear model (`wb`: its w and b), the
    eval loss (and a classifier's eval accuracy) for others."""
    line = f"Epoch {epoch}: loss={loss:.6f}"
    if wb is not None:
        return f"{line} (w={wb[0]:.3f}, b={wb[1]:.3f})"
    if eval_loss is not None:
        right = f", accuracy={accuracy:.1%}" if accuracy is not None else ""
        return f"{line} (eval loss={eval_loss:.6f}{right})"
    return line


def defaults_line(config: TrainConfig, given: Collection[str]) -> Optional[str]:
    """'lr 0.5, epochs 10, batch_size 100 are raytorch's defaults (set --lr, --epochs, --batch-size)':
    for your own model (--model pkg.module:fn), the figures it trains with that neither the flags
    nor the file (`given`: the fields they set) chose; None for a built-in model, or where they chose
    all. lr is left out where your own optimizer sets it."""
    if config.model is None or not is_import_path(config.model):
        return None
    names = [name for name in ("lr", "epochs", "batch_size") if name not in given
             and not (name == "lr" and is_import_path(config.optimizer))]
    if not names:
        return None
    values = ", ".join(f"{name} {getattr(config, name):g}" for name in names)
    flags = ", ".join("--" + name.replace("_", "-") for name in names)
    return f"{values} {'are' if len(names) > 1 else 'is'} raytorch's default{'s' * (len(names) > 1)} (set {flags})"


def dropped_lines(record: dict, config: TrainConfig, workers: int) -> list[str]:
    """Why a loss's replicas were not replaced (a replica_lost record): no room within
    replace_timeout, or timed out too often; the run goes on with `workers`."""
    capped = record.get("capped", [])
    no_room = [name for name in record["dropped"] if name not in capped]
    going_on = f"going on with {workers} replica{'s' * (workers != 1)} (same result)"
    return ([f"{', '.join(capped)} timed out again (step_timeout {config.step_timeout:g} s): not replaced "
             f"again; {going_on}"] if capped else []) + (
        [f"no room for a replacement of {', '.join(no_room)} within replace_timeout {config.replace_timeout:g} s: "
         f"{going_on}"] if no_room else [])


def mixed_devices_line(split: str) -> str:
    return ("mixed devices: each device rounds its own way (other kernels, cuDNN's TF32), so this run matches one "
            "process to float tolerance, not bit for bit"
            + ("" if split == "adaptive" else "; --split adaptive would give each replica the share it can carry"))


def compile_line() -> str:
    return "compiling the model (torch.compile) in each replica: the first steps take longer"


def final_line(eval_loss: float) -> str:
    return f"Final loss is: {eval_loss:.6f}"


def summary_line(loss: float, eval_loss: Optional[float], steps: int, samples: int, wall_s: float,
                 workers: int) -> str:
    """The run's last line: what it reached and what it cost."""
    evaluated = f", eval loss {eval_loss:.6f}" if eval_loss is not None else ""
    return (f"Done: {steps} steps on {workers} replica{'s' * (workers != 1)} in {wall_s:.1f} s "
            f"({samples / wall_s:,.0f} samples/s); last epoch loss {loss:.6f}{evaluated}")


def uneven_line(small: str, large: str, slower: float) -> str:
    """Why an adaptive split is far from even, in one line."""
    return (f"split far from even: {small} measured {slower:.1f}x the time per sample of {large}, so it takes fewer "
            f"samples and neither waits for the other (a replica that shares its core with the driver or other "
            f"work measures slower; --split even cuts evenly)")


def restarts_line(restarts: list[dict]) -> str:
    """'restarts: 1 (replica-1, step 412, ActorDiedError)'."""
    described = "; ".join(f"{', '.join(r['replicas'])}, "
                          + (f"step {r['step']}" if r["step"] is not None else f"while {r['phase']}")
                          + f", {r['cause']}"
                          + (f", continued without {', '.join(r['dropped'])}" if r["dropped"] else "")
                          for r in restarts)
    return f"restarts: {len(restarts)} ({described})"


def memory_line(memory: list[dict[str, int]], ranks: list[int]) -> str:
    """Each replica's peak memory above an idle replica's (RSS; on a GPU, its peak allocated) and
    the training state it holds (parameters, gradient, optimizer state: Replica.memory), in MiB."""
    mib = 2**20

    def one(name: str, m: dict[str, int]) -> str:
        held = m.get("params", 0) + m.get("grad", 0) + m.get("optimizer", 0)
        peak = m["peak_gpu"] if "peak_gpu" in m else m.get("peak_above_baseline", 0)
        return f"{name} {peak / mib:,.0f} MiB (holding {held / mib:,.1f} MiB of training state)"

    where = "allocated on the GPU" if any("peak_gpu" in m for m in memory) else "RSS above an idle replica"
    return f"peak memory per replica ({where}): " + ", ".join(one(replica_name(r), m) for r, m in zip(ranks, memory))
