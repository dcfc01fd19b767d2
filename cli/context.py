"""What every `genq` command shares: the console, the one-line failure, the API client and the
check that a command which needs the database finds an existing one."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from genq.settings import Settings

console = Console(stderr=True, soft_wrap=True)  # a log line stays one line


class CommandFailed(click.ClickException):
    """A failure the user can act on: printed as one line `error: CODE: message`, exit 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def existing_database_url(settings: Settings) -> str:
    """The database URL, once it is known to hold genq's current schema. A SQLite file that
    does not exist is not created: a command run from another directory would make an empty
    database there that the running API never reads."""
    from genq import db  # alembic: loaded only by the commands that use the database

    url = settings.database_url_resolved
    if not settings.database_url:
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise CommandFailed(
                "no_database",
                f"no genq database at {path}. Run genq from the directory where `genq up` "
                f"runs, or set GENQ_DATA_DIR to its data directory.")
    try:
        db.ensure_schema_current(url)
    except db.SchemaOutOfDate as exc:
        raise CommandFailed("schema_out_of_date", str(exc)) from None
    return url


def api_client(settings: Settings):
    from producer.batch_client import BatchClient

    if not settings.api_key:
        raise click.UsageError("set GENQ_API_KEY (create one with `genq keys create NAME`)")
    return BatchClient(settings.api_url, settings.api_key)
