"""The `genq` command line: run the services (up, api, worker), manage the DB and keys, and
submit or fetch jobs through the HTTP API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import click
from rich.console import Console

from cli.batch import batch
from genq import db
from genq.settings import Settings, get_settings
from genq.states import Priority

console = Console(stderr=True)


@click.group()
def main() -> None:
    """genq: a self-hosted job system for LLM text generation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _api_command(settings: Settings, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread",
        "--workers", str(settings.api_workers), "--threads", str(settings.api_threads),
        "--bind", f"{host}:{port}", "--graceful-timeout", "5", "--timeout", "120",
        "--config", "python:results_api.gunicorn_config", "results_api.app:create_app()",
    ]


@main.command()
@click.option("--host", default=None, help="API bind address (default GENQ_API_HOST).")
@click.option("--port", default=None, type=int, help="API port (default GENQ_API_PORT).")
def up(host: str | None, port: int | None) -> None:
    """Start everything: broker (embedded Redis unless GENQ_BROKER_URL), DB, API, one worker,
    one webhook worker."""
    from genq.embedded_broker import EmbeddedRedis

    settings = get_settings()
    host, port = host or settings.api_host, port or settings.api_port
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    env = dict(os.environ, GENQ_DATA_DIR=str(settings.data_dir.resolve()))
    if not settings.broker_url:
        broker = EmbeddedRedis(settings.data_dir)
        env["GENQ_BROKER_URL"] = broker.url
        console.print(f"[green]embedded Redis[/] on {broker.url}")
    db.upgrade(settings.database_url_resolved)
    console.print(f"[green]database[/] {settings.database_url_resolved} is up to date")
    commands = [
        (_api_command(settings, host, port), _api_env(settings, env)),
        ([sys.executable, "-m", "cli", "worker"], env),
        ([sys.executable, "-m", "cli", "webhook-worker"], env),
    ]
    stopping, received = threading.Event(), []

    def request_stop(signum: int, _frame: object) -> None:
        received.append(signum)
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, request_stop)
    children = [_start_child(argv, child_env) for argv, child_env in commands]
    console.print(
        f"[bold green]genq is starting[/]: API on http://{host}:{port} (the worker loads the "
        f"model first). Create a key with `genq keys create NAME`. Ctrl-C stops everything."
    )
    while not stopping.wait(1.0):
        # A child that died (e.g. a worker after an unrecoverable broker error) is restarted,
        # as systemd or a container restart policy would; its jobs come back through leases.
        for index, child in enumerate(children):
            if child.poll() is not None:
                console.print(f"[red]{commands[index][0][-1]} exited ({child.returncode}); "
                              "restarting it[/]")
                children[index] = _start_child(*commands[index])
    console.print("[yellow]stopping genq…[/]")
    # Ctrl-C goes on as SIGINT, each child's own Ctrl-C: gunicorn's quick shutdown, Celery's warm
    # one (a second Ctrl-C too: Celery's cold shutdown). SIGTERM (and a closed terminal's SIGHUP)
    # as SIGTERM: gunicorn's graceful shutdown.
    _signal_all(children, signal.SIGINT if received[0] == signal.SIGINT else signal.SIGTERM)
    signal.signal(signal.SIGINT, lambda *_: _signal_all(children, signal.SIGINT))
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if broker is not None:
        broker.stop()


def _signal_all(children: list[subprocess.Popen], sig: int) -> None:
    for child in children:
        child.send_signal(sig)  # skips a child that has exited


def _start_child(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A child of `genq up` in a process group of its own: Ctrl-C (SIGINT to the terminal's
    foreground group) reaches only `genq up`, which passes it on to each child (the API's
    master then stops its workers). Were the API's gunicorn workers in the foreground group,
    they would get the SIGINT and their master's SIGQUIT at once, and a gthread worker whose
    second quit handler runs inside the first one's ThreadPoolExecutor.shutdown waits on the
    lock that handler holds until the master SIGKILLs it (cpython issue 121649)."""
    return subprocess.Popen(argv, env=env, process_group=0)


@main.command()
@click.option("--host", default=None)
@click.option("--port", default=None, type=int)
def api(host: str | None, port: int | None) -> None:
    """Run the HTTP API under gunicorn."""
    settings = get_settings()
    command = _api_command(settings, host or settings.api_host, port or settings.api_port)
    os.execve(sys.executable, command, _api_env(settings, dict(os.environ)))


def _api_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """The API's gunicorn processes share one prometheus_client multiprocess directory, so
    /metrics counts the HTTP requests of all of them (results_api/metrics.py)."""
    from genq.metrics import MULTIPROCESS_ENV, prepare_multiprocess_dir

    return {**env, MULTIPROCESS_ENV: str(prepare_multiprocess_dir(settings.data_dir))}


@main.command()
@click.option("--model", default=None,
              help="The model this worker serves (default GENQ_MODEL); it consumes only that "
                   "model's queues.")
@click.option("--concurrency", default=None, type=int, help="Jobs in flight (engine batch).")
@click.option("--hostname", default=None, help="Celery node name.")
def worker(model: str | None, concurrency: int | None, hostname: str | None) -> None:
    """Run a worker: one engine for one model fed in micro-batches (by the batch fetcher on
    Redis, Celery's consumer on RabbitMQ), plus the outbox relay and the batch feeder."""
    from genq.queues import is_amqp, job_queues
    from producer.outbox import run_relay

    settings = get_settings()
    if not settings.broker_url:
        raise click.UsageError("set GENQ_BROKER_URL (or use `genq up`, which embeds Redis)")
    db.ensure_schema_current(settings.database_url_resolved)
    # The relay and the batch feeder serve the whole deployment: they keep GENQ_MODEL as the
    # default model of batch lines. Everything else in this process (Celery app, engine,
    # heartbeat) reads get_settings() and must see the served model, so it goes into the
    # environment before any of it loads.
    if model:
        os.environ["GENQ_MODEL"] = model
    if concurrency:  # the engine's batch (runtime) and Celery's threads must agree
        os.environ["GENQ_WORKER_CONCURRENCY"] = str(concurrency)
    get_settings.cache_clear()
    served = get_settings()
    stop_relay = threading.Event()
    threading.Thread(target=run_relay, args=(settings, stop_relay), daemon=True,
                     name="genq-outbox-relay").start()
    from producer.batch_feeder import run_batch_feeder  # issue 7: ingest + windowed enqueue

    threading.Thread(target=run_batch_feeder, args=(settings, stop_relay), daemon=True,
                     name="genq-batch-feeder").start()
    from workers.tasks import app  # registers the task and the engine-loading signals

    argv = [
        "worker", "--pool", "threads",
        "--concurrency", str(served.worker_concurrency + served.worker_standby_jobs),
        # RabbitMQ: Celery's consumer takes the job queue. Redis: the batch fetcher does
        # (workers.redis_fetcher), and Celery's consumer takes none.
        "--exclude-queues" if not is_amqp(served.broker_url) else "--queues",
        ",".join(q.name for q in job_queues(served.broker_url, served.model)),
        "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    try:
        app.worker_main(argv)
    finally:
        stop_relay.set()


@main.command("webhook-worker")
@click.option("--concurrency", default=None, type=int,
              help="HTTP requests in flight (default GENQ_WEBHOOK_CONCURRENCY).")
@click.option("--hostname", default=None, help="Celery node name.")
def webhook_worker(concurrency: int | None, hostname: str | None) -> None:
    """Run the webhook worker: signed HTTP deliveries from the genq.webhooks queue (no model)."""
    from workers.webhook_worker import run_webhook_worker

    settings = get_settings()
    if not settings.broker_url:
        raise click.UsageError("set GENQ_BROKER_URL (or use `genq up`, which embeds Redis)")
    run_webhook_worker(settings, concurrency, hostname)


@main.group(name="db")
def db_group() -> None:
    """Database schema commands."""


@db_group.command()
def upgrade() -> None:
    """Upgrade the database schema to the latest revision (Alembic)."""
    url = get_settings().database_url_resolved
    db.upgrade(url)
    console.print(f"database at revision {db.current_revision(url)}")


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.argument("tenant")
def keys_create(tenant: str) -> None:
    """Create an API key for TENANT (created if new). The key is printed once, last line."""
    from genq.api_keys import create_api_key

    url = get_settings().database_url_resolved
    db.ensure_schema_current(url)
    with db.transaction(url) as session:
        key = create_api_key(session, tenant)
    console.print(f"API key for tenant [bold]{tenant}[/] (shown once, store it now):")
    click.echo(key)


@main.group()
def tenants() -> None:
    """Tenants and their admission limits."""


@tenants.command("set-limits")
@click.argument("tenant")
@click.option("--requests-per-minute", "--rpm", type=click.IntRange(min=0), default=None)
@click.option("--tokens-per-minute", "--tpm", type=click.IntRange(min=0), default=None,
              help="Prompt tokens + max_tokens, counted at admission.")
@click.option("--max-queued-jobs", type=click.IntRange(min=0), default=None)
@click.option("--max-tokens-per-job", type=click.IntRange(min=1), default=None,
              help="The largest max_tokens a job may ask for.")
def tenants_set_limits(tenant: str, **limits: int | None) -> None:
    """Set TENANT's limits; an option left out is unlimited, 0 (where allowed) blocks."""
    from dataclasses import asdict

    from genq.limits import TenantLimits, limits_of, set_limits

    url = get_settings().database_url_resolved
    db.ensure_schema_current(url)
    try:
        with db.transaction(url) as session:
            saved = limits_of(set_limits(session, tenant, TenantLimits(**limits)))
    except LookupError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(json.dumps({"tenant": tenant, **asdict(saved)}, indent=2))


def _client():
    from producer.client import GenqClient

    settings = get_settings()
    if not settings.api_key:
        raise click.UsageError("set GENQ_API_KEY (create one with `genq keys create NAME`)")
    return GenqClient(settings.api_url, settings.api_key)


@main.command()
@click.argument("prompt")
@click.option("--chat/--raw", default=True, help="Send as a chat message (default) or raw prompt.")
@click.option("--max-tokens", default=128, type=int)
@click.option("--temperature", default=0.0, type=float)
@click.option("--priority", default="default", type=click.Choice([p.value for p in Priority]))
@click.option("--model", default=None, help="The model (default: the API's GENQ_MODEL).")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to finish.")
def submit(prompt: str, chat: bool, max_tokens: int, temperature: float, priority: str,
           model: str | None, wait: bool) -> None:
    """Submit a job and print it as JSON."""
    client = _client()
    body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    if model:
        body["model"] = model
    job = client.submit(**body, max_tokens=max_tokens, temperature=temperature, priority=priority)
    if wait:
        with console.status(f"waiting for {job['id']}…"):
            job = client.wait(job["id"], timeout=600)
    click.echo(json.dumps(job, indent=2))


@main.command()
@click.argument("job_id")
def get(job_id: str) -> None:
    """Print a job as JSON."""
    click.echo(json.dumps(_client().get(job_id), indent=2))


main.add_command(batch)  # `genq batch submit | status | download` (cli/batch.py)


if __name__ == "__main__":
    main()
