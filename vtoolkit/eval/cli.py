"""CLI commands for evaluation (`vtoolkit score ...`, `vtoolkit eval`, `vtoolkit sweep`, `vtoolkit report`)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Mount the evaluation commands on the main app."""
    return None
