"""`raytorch train` (and scripts/train.py): flags generated from TrainConfig's fields and docstrings."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from functools import partial
from typing import Optional, Sequence

from .config import TrainConfig, field_choices, field_docs
from .errors import ConfigError, RaytorchError


def build_parser(prog: str = "raytorch train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a built-in model on a built-in dataset over Ray replicas. "
        "Defaults reproduce the seed note's y = 2x + 1 job on 2 replicas.",
        argument_default=argparse.SUPPRESS)  # only flags given on the command line override --config
    parser.add_argument("--config", metavar="FILE", help="YAML file of field: value pairs; flags override it")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest valid checkpoint (same flags as the "
                             "interrupted run; workers may differ); output goes on into RUN_DIR")
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        choices = field_choices(f.name)
        help_text = docs.get(f.name, "") + (f" (default: {f.default})" if f.default is not None else "")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            parser.add_argument(flag, type=str if choices else kind, metavar=f.name.upper(),
                                help=help_text + (f"; one of: {', '.join(choices)}" if choices else ""))
    return parser


def parse_args(argv: Sequence[str]) -> tuple[TrainConfig, dict]:
    """The run's config, and the options that are not part of it (quiet, resume)."""
    args = vars(build_parser().parse_args(argv))
    options = {"quiet": args.pop("quiet", False), "resume_from": args.pop("resume", None)}
    path = args.pop("config", None)
    if options["resume_from"] and "output_dir" not in args:
        args["output_dir"] = options["resume_from"]  # a resumed run goes on writing where it was
    return (TrainConfig.from_yaml(path, **args) if path else TrainConfig(**args)), options


def parse_config(argv: Sequence[str]) -> TrainConfig:
    return parse_args(argv)[0]


def train(argv: Sequence[str]) -> int:
    try:
        config, options = parse_args(argv)
        from . import builtins
        from .driver import Trainer  # imports Ray: after the config, so bad flags fail fast

        task = builtins.DATASETS[config.dataset]
        model_fn = partial(builtins.MODELS[config.model], task.in_features, task.out_features)
        Trainer(config, model_fn=model_fn, loss_fn=task.loss, dataset_fn=partial(task.train, config.seed),
                eval_dataset_fn=partial(task.eval, config.seed), **options).fit()
    except ConfigError as e:
        print(f"raytorch: error: {e}", file=sys.stderr)
        return 2
    except RaytorchError as e:
        print(f"raytorch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raytorch: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: raytorch train [flags]   (raytorch train --help lists them)")
        return 0 if argv else 2
    if argv[0] != "train":
        print(f"raytorch: error: unknown command {argv[0]!r}; the command is `raytorch train`", file=sys.stderr)
        return 2
    return train(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
