"""CLI command `vtoolkit bench`."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Mount the bench command on the main app."""
    return None
