"""`vtoolkit score NAME`: score saved model outputs with the exact original scorers (no model needed).

Each registered benchmark may add its sub-command (:meth:`vtoolkit.eval.benchmark.Benchmark.add_score_command`);
``vtoolkit/eval/cli.py::register`` mounts them as ``app.add_typer(score_app, name="score")``. This module holds what
the commands share. Every command prints a rich table, or JSON with ``--json``; bad inputs exit with status 2 and a
one-line message.
"""
from __future__ import annotations

import json
from enum import Enum

import typer

score_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Score saved outputs with each benchmark's original scorer, re-implemented exactly "
                             "(the benchmarks: vtoolkit list --benchmarks).")


class ZeroDivision(str, Enum):
    original = "original"
    raise_ = "raise"
    zero = "zero"


class ZeroDivisionUndefined(str, Enum):
    original = "original"
    raise_ = "raise"
    zero = "zero"
    undefined = "undefined"


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _err_text(e: BaseException, flags: dict[str, str]) -> str:
    """The error's message (KeyError's quotes dropped) with the scorer's keyword hints written as this command's
    options (``zero_division='zero'`` -> ``--zero-division zero``)."""
    from vtoolkit.eval.scorers._io import with_flags

    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return with_flags(text, flags)


def _zd(z) -> str | None:
    return None if z.value == "original" else z.value


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _table(title: str, columns: list[str]):
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def _print(table) -> None:
    from vtoolkit.cli import print_table

    print_table(table)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.2f}"
