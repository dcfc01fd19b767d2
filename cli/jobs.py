"""`genq submit | get | list | cancel`: one job at a time through the HTTP API, printed as
JSON on stdout."""

from __future__ import annotations

import json

import click

from cli.context import api_client, console
from genq.settings import get_settings
from genq.states import JobStatus, Priority


def _print(value: dict) -> None:
    click.echo(json.dumps(value, indent=2))


@click.command()
@click.argument("prompt")
@click.option("--chat/--raw", default=True, help="A chat message (default) or a raw prompt.")
@click.option("--max-tokens", default=128, type=int, show_default=True)
@click.option("--temperature", default=0.0, type=float, show_default=True)
@click.option("--priority", default="default", type=click.Choice([p.value for p in Priority]))
@click.option("--model", default=None, help="Default: the API's GENQ_MODEL.")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to finish.")
def submit(prompt: str, chat: bool, max_tokens: int, temperature: float, priority: str,
           model: str | None, wait: bool) -> None:
    """Submit PROMPT as a job; print the job."""
    client = api_client(get_settings())
    body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    if model:
        body["model"] = model
    job = client.submit(**body, max_tokens=max_tokens, temperature=temperature, priority=priority)
    if wait:
        with console.status(f"waiting for {job['id']}…"):
            job = client.wait(job["id"], timeout=600)
    _print(job)


@click.command()
@click.argument("job_id")
def get(job_id: str) -> None:
    """Print job JOB_ID."""
    _print(api_client(get_settings()).get(job_id))


@click.command("list")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Jobs per page (the API's default and maximum apply).")
@click.option("--after", default=None, help="A job id: the page after it.")
def list_jobs(status: str | None, limit: int | None, after: str | None) -> None:
    """List your jobs, newest first."""
    _print(api_client(get_settings()).list(status=status, limit=limit, after=after))


@click.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel job JOB_ID; print it."""
    _print(api_client(get_settings()).cancel(job_id))
