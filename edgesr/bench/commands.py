"""CLI commands of the bench subsystem (placeholder until implemented)."""

import typer


def register(app: typer.Typer) -> None:
    pass
