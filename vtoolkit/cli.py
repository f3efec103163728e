"""`vtoolkit` command line: thin commands over the public Python API.

Sub-command groups live next to the code they drive (``vtoolkit/eval/cli.py``, ``vtoolkit/bench/cli.py``) and are
mounted here, so this file stays a table of contents.
"""
from __future__ import annotations

import json
import os

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Training-free visual-token pruning and hallucination mitigation for HF multimodal LLMs.")


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    """vtoolkit: apply, evaluate and benchmark training-free methods on stock HF multimodal LLMs."""
    if version:
        import vtoolkit

        typer.echo(vtoolkit.__version__)
        raise typer.Exit()


@app.command("list")
def list_cmd(pattern: str = typer.Argument("*", help="glob over method names, e.g. '*prune*' or 'fast*'"),
             as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the registered methods: name, kind, supported architectures, requirements."""
    import vtoolkit as vt

    rows = vt.list_methods(pattern)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vtoolkit methods")
    for col in ("name", "kind", "stage", "architectures", "requires", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["stage"], ", ".join(r["architectures"]), ", ".join(r["requires"]) or "-",
                      r["description"])
    Console().print(table)


def _mount_subcommands() -> None:
    from vtoolkit.demo import register as register_demo
    from vtoolkit.eval.cli import register as register_eval

    register_eval(app)
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
