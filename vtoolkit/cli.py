"""`vtoolkit` command line: thin commands over the public Python API.

Sub-command groups live next to the code they drive (``vtoolkit/eval/cli.py``, ``vtoolkit/bench/cli.py``) and are
mounted here, so this file stays a table of contents.

Errors: every command runs inside :class:`RootGroup`, which prints an expected error (a wrong setting, a missing or
malformed file, a bad option value) as one ``error:`` line per problem and exits with status 2, and any other error
as one line with status 1; ``vtoolkit --debug ...`` or ``VTOOLKIT_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import json
import os

import typer
import typer.core

_debug = False


def _click_types(name: str) -> tuple[type[BaseException], ...]:
    """``name`` (Exit, Abort, ClickException) as typer raises it: typer >= 0.2x vendors click under its own
    classes, older typer uses click's."""
    own = {"ClickException": typer.TyperException}.get(name, getattr(typer, name, None))
    try:
        import click.exceptions as ce
    except ImportError:  # pragma: no cover - click is not installed next to a typer that vendors it
        return (own,)
    return (own, getattr(ce, name))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong" (exit 2), as opposed to a failure while running (exit 1)."""
    import yaml

    from vtoolkit.config import ConfigError

    return ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError, yaml.YAMLError


def _message(e: BaseException) -> str:
    """The text of an error without Python's decorations (KeyError quotes, errno prefixes)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror.lower()}"
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def fail(message: str, code: int = 2) -> None:
    """Print ``error: <line>`` for each line of ``message`` on stderr and exit with ``code``."""
    for line in message.strip().splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code=code)


class RootGroup(typer.core.TyperGroup):
    """The ``vtoolkit`` group: one line per error instead of a traceback or a usage box (see the module docstring)."""

    def invoke(self, ctx):
        global _debug
        _debug = os.environ.get("VTOOLKIT_DEBUG", "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except _click_types("Exit") + _click_types("Abort"):
            raise
        except _click_types("ClickException") as e:
            if _debug or type(e).__name__ == "NoArgsIsHelpError":   # the help text of `vtoolkit score`
                raise
            where = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) is not None else ""
            fail(" ".join(e.format_message().split()) + where, e.exit_code)
        except _user_errors() as e:
            if _debug:
                raise
            fail(_message(e), 2)
        except Exception as e:  # noqa: BLE001 - a failure while running: one line, the traceback on request
            if _debug:
                raise
            fail(f"{type(e).__name__}: {_message(e)} (rerun with 'vtoolkit --debug ...' for the traceback)", 1)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=RootGroup,
                  help="Training-free visual-token pruning and hallucination mitigation for HF multimodal LLMs.")


def print_table(table) -> None:
    """Print a rich table on stdout; into a pipe or file at its natural width, not squeezed into rich's default 80
    columns (``--json`` is the format for machines)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(80, Console(width=100_000).measure(table).maximum))
    console.print(table)


def _print_version(value: bool) -> None:
    if value:
        import vtoolkit

        typer.echo(f"vtoolkit {vtoolkit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors (also "
                                                           "VTOOLKIT_DEBUG=1)")) -> None:
    """vtoolkit: apply, evaluate and benchmark training-free methods on stock HF multimodal LLMs."""
    global _debug
    _debug = _debug or debug


@app.command("list")
def list_cmd(pattern: str = typer.Argument("*", help="glob over method names or kinds, e.g. 'fast*' or prune"),
             as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
             markdown: bool = typer.Option(False, "--markdown", help="print the README's table of methods and the "
                                                                     "model types each supports"),
             benchmarks: bool = typer.Option(False, "--benchmarks", help="list the registered benchmarks (built-in "
                                                                         "and plug-ins) with their metrics instead")
             ) -> None:
    """List the registered methods: name, kind, supported architectures, requirements (``--benchmarks``: the
    registered benchmarks with their headline and secondary metrics)."""
    import vtoolkit as vt

    if benchmarks:
        _list_benchmarks(pattern, as_json)
        return
    rows = vt.list_methods(pattern)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    if not rows:
        names = ", ".join(r["name"] for r in vt.list_methods())
        typer.echo(f"no method matches {pattern!r}; registered methods: {names}", err=True)
        raise typer.Exit(1)
    if as_json:
        return
    if markdown:
        from vtoolkit.eval.validate import methods_markdown

        typer.echo(methods_markdown(rows), nl=False)
        return
    from rich.table import Table

    table = Table(title="vtoolkit methods")
    for col in ("name", "kind", "stage", "architectures", "requires", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["stage"], ", ".join(r["architectures"]), ", ".join(r["requires"]) or "-",
                      r["description"])
    print_table(table)


def _list_benchmarks(pattern: str, as_json: bool) -> None:
    import fnmatch

    from vtoolkit.eval.benchmark import get_benchmark, list_benchmarks

    rows = [get_benchmark(n).describe() for n in list_benchmarks() if fnmatch.fnmatch(n, pattern)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    if not rows:
        typer.echo(f"no benchmark matches {pattern!r}; registered benchmarks: {', '.join(list_benchmarks())}",
                   err=True)
        raise typer.Exit(1)
    if as_json:
        return
    from rich.table import Table

    table = Table(title="vtoolkit benchmarks")
    for col in ("name", "headline", "unit", "other metrics", "scorer rules", "layouts", "from"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["headline"] + ("" if r["higher_is_better"] else " (lower is better)"), r["unit"],
                      ", ".join(r["metrics"]) or "-", ", ".join(r["rules"]), ", ".join(r["layouts"]), r["module"])
    print_table(table)


def _mount_subcommands() -> None:
    from vtoolkit.demo import register as register_demo
    from vtoolkit.eval.cli import register as register_eval

    register_eval(app)
    from vtoolkit.train.cli import register as register_train

    register_train(app)
    register_demo(app)
    try:
        from vtoolkit.bench.cli import register as register_bench
    except ImportError:  # pragma: no cover - bench is optional at import time
        return
    register_bench(app)


_mount_subcommands()


def main() -> None:  # console-script entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
