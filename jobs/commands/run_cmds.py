"""CLI commands (registered by jobs.cli)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
