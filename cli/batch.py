"""`genq batch submit | status | download`: run a JSONL file as a batch through the HTTP API,
with a progress bar (done / failed / total, tokens/s, ETA)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn

from cli.context import api_client, console
from genq.batch_states import BatchStatus
from genq.settings import get_settings

POLL_SECONDS = 1.0


def _client():
    return api_client(get_settings())


@click.group()
def batch() -> None:
    """Bulk generation from OpenAI Batch JSONL files."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", default="/v1/chat/completions",
              type=click.Choice(["/v1/chat/completions", "/v1/completions"]))
@click.option("--window", "completion_window", default="24h", help="Completion window.")
@click.option("--strict", is_flag=True, help="Fail the whole batch if any line is malformed.")
@click.option("--wait/--no-wait", default=False, help="Show progress until the batch ends.")
def submit(file: Path, endpoint: str, completion_window: str, strict: bool, wait: bool) -> None:
    """Upload FILE and start a batch; print it.

    With --wait, show progress and print the batch when it ends."""
    client = _client()
    with console.status(f"uploading {file.name}…"):
        uploaded = client.upload_file(file)
    created = client.create_batch(uploaded["id"], endpoint, completion_window,
                                  {"strict": "true"} if strict else None)
    console.print(f"batch [bold]{created['id']}[/] created ({uploaded['line_count']} lines)")
    click.echo(json.dumps(_follow(client, created["id"]) if wait else created, indent=2))


@batch.command("status")
@click.argument("batch_id")
def status(batch_id: str) -> None:
    """Print a batch as JSON."""
    click.echo(json.dumps(_client().get_batch(batch_id), indent=2))


@batch.command("download")
@click.argument("batch_id")
@click.option("-o", "--output-dir", default=".", type=click.Path(file_okay=False, path_type=Path))
def download(batch_id: str, output_dir: Path) -> None:
    """Save a batch's output and error files.

    While the batch runs they hold what is done so far."""
    client = _client()
    current = client.get_batch(batch_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("output", "error"):
        destination = output_dir / f"{batch_id}_{kind}.jsonl"
        written = client.download_file(current[f"{kind}_file_id"], destination)
        console.print(f"{kind}: {destination} ({written} bytes)")


def _follow(client, batch_id: str) -> dict:
    console.print(f"following batch [bold]{batch_id}[/] (Ctrl-C stops following, not the batch)")
    with Progress(*progress_columns(), console=console) as progress:
        task = progress.add_task(batch_id, total=None, status="", counts="", rate="", eta="")
        while True:
            current = client.get_batch(batch_id)
            counts = current["request_counts"]
            progress.update(task, total=counts["total"] or None,
                            completed=counts["completed"] + counts["failed"],
                            **progress_fields(current))
            if BatchStatus(current["status"]).is_terminal:
                return current
            time.sleep(POLL_SECONDS)


def progress_columns() -> tuple:
    """One line that fits 80 columns for a 50,000-line batch: status, bar, done / failed /
    total, tokens per second and ETA (the batch id is printed once above it)."""
    return (TextColumn("{task.fields[status]:<11}"), BarColumn(bar_width=14),
            TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"))


def progress_fields(current: dict) -> dict[str, str]:
    counts, extra = current["request_counts"], current["progress"]
    eta = extra["eta_seconds"]
    return {
        "status": current["status"],
        "counts": f"done {counts['completed']} failed {counts['failed']} of {counts['total']}",
        "rate": f"{extra['tokens_per_second'] or 0:.0f} tok/s",
        "eta": "ETA –" if eta is None else f"ETA {_duration(eta)}",
    }


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
