"""`genq batch submit | status | download`: run a JSONL file as a batch through the HTTP API,
with a progress bar (done / failed / total, tokens/s, ETA)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from genq.batch_states import BatchStatus
from genq.settings import get_settings

console = Console(stderr=True)
POLL_SECONDS = 1.0


def _client():
    from producer.batch_client import BatchClient

    settings = get_settings()
    if not settings.api_key:
        raise click.UsageError("set GENQ_API_KEY (create one with `genq keys create NAME`)")
    return BatchClient(settings.api_url, settings.api_key)


@click.group()
def batch() -> None:
    """Bulk generation: OpenAI-Batch-compatible JSONL files."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", default="/v1/chat/completions",
              type=click.Choice(["/v1/chat/completions", "/v1/completions"]))
@click.option("--window", "completion_window", default="24h", help="Completion window.")
@click.option("--strict", is_flag=True, help="Fail the whole batch if any line is malformed.")
@click.option("--wait/--no-wait", default=False, help="Show progress until the batch ends.")
def submit(file: Path, endpoint: str, completion_window: str, strict: bool, wait: bool) -> None:
    """Upload FILE and start a batch; prints the batch as JSON (at the end with --wait)."""
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
    """Save the batch's output and error files (partial while it runs) into a directory."""
    client = _client()
    current = client.get_batch(batch_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("output", "error"):
        destination = output_dir / f"{batch_id}_{kind}.jsonl"
        written = client.download_file(current[f"{kind}_file_id"], destination)
        console.print(f"{kind}: {destination} ({written} bytes)")


def _follow(client, batch_id: str) -> dict:
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[rate]}"),
               TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(batch_id, total=None, counts="", rate="", eta="–")
        while True:
            current = client.get_batch(batch_id)
            counts, extra = current["request_counts"], current["progress"]
            progress.update(
                task, total=counts["total"] or None,
                completed=counts["completed"] + counts["failed"],
                description=f"{batch_id} {current['status']}",
                counts=f"done {counts['completed']} / failed {counts['failed']} / "
                       f"total {counts['total']}",
                rate=f"{extra['tokens_per_second'] or 0:.0f} tok/s",
                eta="–" if extra["eta_seconds"] is None else f"{extra['eta_seconds']:.0f}s",
            )
            if BatchStatus(current["status"]).is_terminal:
                return current
            time.sleep(POLL_SECONDS)
