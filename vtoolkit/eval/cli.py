"""CLI commands for evaluation (`vtoolkit score ...`, `vtoolkit eval`, `vtoolkit sweep`, `vtoolkit report`)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Mount the evaluation commands on the main app."""
    from vtoolkit.eval.benchmark import get_benchmark, list_benchmarks
    from vtoolkit.eval.cli_score import score_app

    for name in list_benchmarks():   # each benchmark may add `vtoolkit score NAME`
        get_benchmark(name).add_score_command(score_app)
    app.add_typer(score_app, name="score")
    from vtoolkit.eval.cli_eval import register_commands

    register_commands(app)
