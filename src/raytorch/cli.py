"""`raytorch train` (and scripts/train.py): flags generated from TrainConfig's fields and docstrings."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import time
import typing
from typing import TYPE_CHECKING, Optional, Sequence

import yaml

from .config import TrainConfig, elastic_range, field_choices, field_docs, read_yaml, with_recipe
from .driver.preflight import preflight
from .driver.signals import EXIT_CODES
from .errors import ConfigError, Interrupted, RaytorchError
from .output.lines import defaults_line

if TYPE_CHECKING:
    from .driver.trainer import Trainer


def build_parser(prog: str = "raytorch train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a built-in model on a built-in dataset over Ray replicas. "
        "Defaults reproduce the seed note's y = 2x + 1 job on 2 replicas.",
        argument_default=argparse.SUPPRESS)  # only flags given on the command line override --config
    parser.add_argument("--config", metavar="FILE", help="YAML file of field: value pairs; flags override it")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (a path, or a URL as --output-dir takes: s3://bucket/run) "
                             "from its newest valid checkpoint (same flags as the interrupted run; workers may "
                             "differ); output goes on into RUN_DIR")
    parser.add_argument("--submit", action="store_true",
                        help="run as a Ray job on the cluster at --address (the dashboard's Jobs page then holds its "
                             "log): the current directory goes along as its working directory; the console follows "
                             "its log, and the exit code is the job's")
    parser.add_argument("--detach", action="store_true", help="with --submit: return once the job is submitted")
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        choices = field_choices(f.name)
        help_text = docs.get(f.name, "") + (f" (default: {f.default})" if f.default is not None else "")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "callbacks":  # --callback too, as Lightning and Ray Train users would type it
            parser.add_argument(flag, "--callback", metavar="NAME,...", help=help_text)
        elif f.name == "workers":  # N, or MIN:MAX for an elastic run (see elastic_range)
            parser.add_argument(flag, metavar="N|MIN:MAX", help=help_text + "; MIN:MAX: elastic, see --max-workers")
        else:
            kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            parser.add_argument(flag, type=str if choices else kind, metavar=f.name.upper(),
                                help=help_text + (f"; one of: {', '.join(choices)}" if choices else ""))
    return parser


def parse_args(argv: Sequence[str]) -> tuple[TrainConfig, dict]:
    """The run's config, checked against this machine too (preflight: tensorboard, a URL's fsspec
    backend), and the options that are not part of it (quiet, resume, submit, detach; given: the
    fields the file or the flags set)."""
    args = vars(build_parser().parse_args(argv))
    options = {"quiet": args.pop("quiet", False), "resume_from": args.pop("resume", None),
               "submit": args.pop("submit", False), "detach": args.pop("detach", False)}
    if options["detach"] and not options["submit"]:
        raise ConfigError("detach", "only with --submit")
    path = args.pop("config", None)
    if options["resume_from"] and "output_dir" not in args:
        args["output_dir"] = options["resume_from"]  # a resumed run goes on writing where it was
    values = elastic_range({**(read_yaml(path) if path else {}), **args})
    options["given"] = frozenset(values)
    config = TrainConfig.from_dict(with_recipe(values), source=f"config {path}" if path else "flags")
    preflight(config)  # here too, not only in Trainer.fit: --submit and config show check before they go on
    return config, options


def parse_config(argv: Sequence[str]) -> TrainConfig:
    return parse_args(argv)[0]


def failed(error: RaytorchError) -> int:
    """One line on stderr; the exit code: 2 for bad input (ConfigError), 1 for the rest."""
    print(f"raytorch: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, ConfigError) else 1


def prepared(config: TrainConfig, options: dict) -> Trainer:
    """The Trainer `raytorch train` runs, made without starting Ray: your model, data and loss
    imported (the model built once), your step, optimizer, schedule, collate and callbacks loaded,
    so a bad path fails here, naming its field."""
    from .tasks.resolve import training

    what = training(config)
    from .driver.trainer import Trainer  # imports Ray: after the config, so bad flags fail fast

    return Trainer(config, model_fn=what.model_fn, loss_fn=what.loss_fn, dataset_fn=what.dataset_fn,
                   eval_dataset_fn=what.eval_dataset_fn, quiet=options["quiet"],
                   resume_from=options["resume_from"])  # step, optimizer by path: from config


def train(argv: Sequence[str]) -> int:
    try:
        config, options = parse_args(argv)
        if options["submit"]:  # checked here, run there
            from .submit import submit

            return submit(argv, config.address, options["detach"], f"raytorch-{time.strftime('%Y%m%d-%H%M%S')}")
        trainer = prepared(config, options)
        defaults = defaults_line(config, options["given"])
        if defaults and not options["quiet"]:
            print(defaults, flush=True)
        trainer.fit()
    except RaytorchError as e:  # ConfigError too
        return failed(e)
    except Interrupted as stopped:  # a first SIGINT or SIGTERM: stopped between steps
        name = signal.Signals(stopped.signum).name
        if stopped.checkpoint:
            resume = [] if "--resume" in argv else ["--resume", config.output_dir]
            print(f"raytorch: stopped by {name} before step {stopped.step}; resume with: raytorch train "
                  f"{shlex.join([*argv, *resume])}", file=sys.stderr)
        else:
            print(f"raytorch: stopped by {name} before step {stopped.step} (no --output-dir: nothing to resume from)",
                  file=sys.stderr)
        return EXIT_CODES.get(stopped.signum, 130)
    except KeyboardInterrupt:
        print("raytorch: interrupted", file=sys.stderr)
        return 130
    return 0


def show_config(argv: Sequence[str]) -> int:
    """`raytorch config show [flags]`: the resolved config (defaults, recipe, file, flags) as YAML,
    after the checks `raytorch train` makes before Ray starts, failing as it fails."""
    try:
        config, options = parse_args(argv)
        prepared(config, options)
    except RaytorchError as e:  # ConfigError too
        return failed(e)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


USAGE = ("usage: raytorch train [flags]        train (raytorch train --help lists the flags)\n"
         "       raytorch tune --config FILE   a Ray Tune search, one raytorch run per trial (examples/search.yaml)\n"
         "       raytorch config show [flags]  print the config those flags resolve to, as YAML")


def tune(argv: Sequence[str]) -> int:
    """`raytorch tune --config search.yaml [--address ADDR]`: prints the best trial's config,
    figures and checkpoint."""
    parser = argparse.ArgumentParser(prog="raytorch tune", description="A Ray Tune search: each trial one raytorch "
                                     "run, its replicas in the trial's resources.")
    parser.add_argument("--config", metavar="FILE", required=True, help="search YAML (see examples/search.yaml)")
    parser.add_argument("--address", help="Ray cluster to join; default RAY_ADDRESS, else a local Ray on 127.0.0.1")
    args = parser.parse_args(argv)
    try:
        from .tune import run_search

        results = run_search(args.config, args.address)
        best = results.get_best_result()
    except RaytorchError as e:  # ConfigError too
        return failed(e)
    if best.error is not None and best.metrics is None:
        print(f"raytorch: error: no trial finished: {best.error}", file=sys.stderr)
        return 1
    figures = ", ".join(f"{k} {v:.6g}" for k, v in best.metrics.items()
                        if k in ("train_loss", "eval_loss", "eval_accuracy", "epoch"))
    print(f"best trial: {best.config}\n  {figures}\n  checkpoint {best.checkpoint.path if best.checkpoint else None}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "train":
        return train(argv[1:])
    if argv[0] == "tune":
        return tune(argv[1:])
    if argv[:2] == ["config", "show"]:
        return show_config(argv[2:])
    print(f"raytorch: error: unknown command {' '.join(argv[:2])!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
