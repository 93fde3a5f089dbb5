"""mkdocs hook: the CLI reference's tables, generated at build time from the parser `raytorch train`
uses (raytorch.cli.build_parser) and from TrainConfig's fields and their docstrings, so the page
cannot drift from the code. docs/reference/cli.md holds the markers this replaces."""

from __future__ import annotations

import dataclasses
import typing

import raytorch
from raytorch.cli import USAGE, build_parser
from raytorch.config import RECIPES, RUN_DEFINING, field_choices, field_docs

PAGE = "reference/cli.md"
MARKERS = {
    "<!-- generated: usage -->": lambda: f"```\n{USAGE}\n```",
    "<!-- generated: options -->": lambda: options_table(),
    "<!-- generated: fields -->": lambda: fields_table(),
    "<!-- generated: run-defining -->": lambda: ", ".join(f"`{name}`" for name in RUN_DEFINING),
    "<!-- generated: recipes -->": lambda: recipes_table(),
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    for marker, make in MARKERS.items():
        if marker not in markdown:
            raise ValueError(f"{PAGE} lost its marker {marker}")
        markdown = markdown.replace(marker, make())
    return markdown


def cell(text: str) -> str:
    """Text fit for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def flags(action) -> str:
    return "<br>".join(f"`{flag}`" for flag in action.option_strings)


def fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(raytorch.TrainConfig)}


def actions() -> list:
    """The parser's options, in the order `--help` lists them (argparse keeps them in `_actions`)."""
    return [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]


def options_table() -> str:
    """What the command adds besides TrainConfig's fields (--config, --quiet, --resume, ...)."""
    rows = ["| Flag | Value | Description |", "|---|---|---|"]
    for action in actions():
        if action.dest not in fields():
            value = f"`{action.metavar}`" if action.metavar else "switch"
            rows.append(f"| {flags(action)} | {value} | {cell(action.help)} |")
    return "\n".join(rows)


def value_kind(name: str) -> str:
    """A field's values, in words: its choices, or its type."""
    choices = field_choices(name)
    if choices:
        return "<br>".join(f"`{c}`" for c in choices)
    hint = typing.get_type_hints(raytorch.TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if args else hint
    return "on/off" if kind is bool else kind.__name__


def default_of(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def fields_table() -> str:
    """One row per TrainConfig field: its flag(s), YAML key, values, default and docstring."""
    docs, by_name = field_docs(), fields()
    rows = ["| Flag, YAML key | Value | Default | Description |", "|---|---|---|---|"]
    for action in actions():
        f = by_name.get(action.dest)
        if f is not None:
            rows.append(f"| {flags(action)}<br>`{f.name}:` | {value_kind(f.name)} | {default_of(f)} | "
                        f"{cell(docs.get(f.name, ''))} |")
    missing = set(by_name) - {a.dest for a in actions()}
    if missing:
        raise ValueError(f"TrainConfig fields without a flag: {', '.join(sorted(missing))}")
    return "\n".join(rows)


def recipes_table() -> str:
    """What each built-in dataset's recipe sets, one row per dataset."""
    names = list(dict.fromkeys(name for recipe in RECIPES.values() for name in recipe))
    rows = ["| `--dataset` | " + " | ".join(f"`{name}`" for name in names) + " |", "|---" * (len(names) + 1) + "|"]
    for dataset, recipe in RECIPES.items():
        rows.append(f"| `{dataset}` | " + " | ".join(f"`{recipe[n]}`" if n in recipe else "" for n in names) + " |")
    return "\n".join(rows)
