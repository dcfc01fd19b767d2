"""`genq up | api | worker | webhook-worker | db upgrade`: run genq's processes. `genq up` runs
them all on one host, on embedded defaults (SQLite and an embedded Redis) unless configured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import click

from cli.context import console, existing_database_url
from genq.settings import Settings, get_settings

# A worker stopping takes its drain (GENQ_WORKER_DRAIN_SECONDS), the 5 s grace after it in
# which unfinished jobs go back to the queue, and a few seconds to close its engine and broker
# connection. `genq up` waits that long before it kills it: killed sooner, its jobs stay
# `running` under a live lease and a clean stop costs them an attempt.
WORKER_STOP_MARGIN_SECONDS = 15.0
OTHER_CHILD_STOP_SECONDS = 30.0


def worker_stop_seconds(settings: Settings) -> float:
    return settings.worker_drain_seconds + WORKER_STOP_MARGIN_SECONDS


# Uvicorn workers: waits and streams live on an event loop, not in request threads
# (results_api.asgi); Flask's routes run in a pool of GENQ_API_THREADS threads per process,
# at most GENQ_MAX_CALLS_PER_KEY of them per key.
API_WORKER_CLASS = "results_api.gunicorn_config.ApiWorker"


def _api_command(settings: Settings, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "--worker-class", API_WORKER_CLASS,
        "--workers", str(settings.api_workers),
        "--bind", f"{host}:{port}", "--graceful-timeout", "5", "--timeout", "120",
        "--config", "python:results_api.gunicorn_config", "results_api.asgi:create_asgi_app()",
    ]


def _api_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """The API's gunicorn processes share one prometheus_client multiprocess directory, so
    /metrics counts the HTTP requests of all of them (results_api/metrics.py)."""
    from genq.metrics import MULTIPROCESS_ENV, prepare_multiprocess_dir

    return {**env, MULTIPROCESS_ENV: str(prepare_multiprocess_dir(settings.data_dir))}


@click.command()
@click.option("--host", default=None, help="API bind address (default GENQ_API_HOST).")
@click.option("--port", default=None, type=int, help="API port (default GENQ_API_PORT).")
def up(host: str | None, port: int | None) -> None:
    """Run broker, database, API and workers here.

    On embedded defaults (no GENQ_BROKER_URL, no GENQ_DATABASE_URL) the data lives in
    GENQ_DATA_DIR (default ./.genq): the SQLite database, the embedded Redis and its address.
    """
    from genq import db
    from genq.embedded_broker import EmbeddedRedis

    settings = get_settings()
    host, port = host or settings.api_host, port or settings.api_port
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[green]data[/] in {data_dir} (run genq commands from {os.getcwd()}, "
                  f"or set GENQ_DATA_DIR={data_dir})")
    broker = None
    env = dict(os.environ, GENQ_DATA_DIR=str(data_dir))
    if not settings.broker_url:
        broker = EmbeddedRedis(data_dir, settings.embedded_broker_port)
        env["GENQ_BROKER_URL"] = broker.url
        console.print(f"[green]embedded Redis[/] on {broker.url} (address in {broker.url_file})")
    if not settings.broker_url and not settings.database_url and \
            "GENQ_WEBHOOK_ALLOW_PRIVATE" not in os.environ:
        env["GENQ_WEBHOOK_ALLOW_PRIVATE"] = "true"
        console.print("[yellow]webhooks[/] may target private and loopback addresses (local "
                      "development on embedded defaults; set GENQ_WEBHOOK_ALLOW_PRIVATE=false "
                      "to refuse them)")
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
    console.print(f"[yellow]stopping genq…[/] (the worker drains for up to "
                  f"{worker_stop_seconds(settings):.0f} s)")
    # Ctrl-C goes on as SIGINT, each child's own Ctrl-C: gunicorn's quick shutdown, Celery's warm
    # one (a second Ctrl-C too: Celery's cold shutdown). SIGTERM (and a closed terminal's SIGHUP)
    # as SIGTERM: gunicorn's graceful shutdown.
    _signal_all(children, signal.SIGINT if received[0] == signal.SIGINT else signal.SIGTERM)
    signal.signal(signal.SIGINT, lambda *_: _signal_all(children, signal.SIGINT))
    stop_seconds = [OTHER_CHILD_STOP_SECONDS, worker_stop_seconds(settings),
                    OTHER_CHILD_STOP_SECONDS]
    wait_or_kill(children, stop_seconds)
    if broker is not None:
        broker.stop()


def wait_or_kill(children: list[subprocess.Popen], seconds: list[float]) -> None:
    """Wait for each child up to its own number of seconds (counted from now, all together),
    then SIGKILL it."""
    started = time.monotonic()
    for child, limit in zip(children, seconds, strict=True):
        try:
            child.wait(timeout=max(0.0, started + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[red]{child.args[-1]} still running after {limit:.0f} s; killing it")
            child.kill()
            child.wait()


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


@click.command()
@click.option("--host", default=None, help="Bind address (default GENQ_API_HOST).")
@click.option("--port", default=None, type=int, help="Port (default GENQ_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Run the HTTP API under gunicorn."""
    settings = get_settings()
    command = _api_command(settings, host or settings.api_host, port or settings.api_port)
    os.execve(sys.executable, command, _api_env(settings, dict(os.environ)))


def _require_broker(settings: Settings) -> None:
    if not settings.broker_url:
        raise click.UsageError("set GENQ_BROKER_URL (or use `genq up`, which embeds Redis)")


def _check_version(_ctx: click.Context, _param: click.Parameter, value: str | None
                   ) -> str | None:
    from genq.routing import VERSION_PATTERN

    if value is not None and not VERSION_PATTERN.fullmatch(value):
        raise click.BadParameter("letters, digits, '.', '_' or '-' only (at most 64)")
    return value


@click.command()
@click.option("--model", default=None, help="The model served (default GENQ_MODEL).")
@click.option("--model-version", default=None, callback=_check_version,
              help="The version served; it takes only that version's jobs.")
@click.option("--concurrency", default=None, type=int, help="Jobs in flight (engine batch).")
@click.option("--hostname", default=None, help="Celery node name.")
def worker(model: str | None, model_version: str | None, concurrency: int | None,
           hostname: str | None) -> None:
    """Run a worker for one model (micro-batches)."""
    from genq.queues import job_queues
    from producer.outbox import run_relay

    settings = get_settings()
    _require_broker(settings)
    existing_database_url(settings)
    # The relay and the batch feeder serve the whole deployment: they keep GENQ_MODEL as the
    # default model of batch lines. The Celery app, its Worker (engine, heartbeat) get the
    # served model's settings, passed explicitly.
    served = settings.model_copy(update={
        name: value for name, value in (("model", model), ("model_version", model_version),
                                        ("worker_concurrency", concurrency)) if value})
    stop_relay = threading.Event()
    threading.Thread(target=run_relay, args=(settings, stop_relay), daemon=True,
                     name="genq-outbox-relay").start()
    from producer.batch_feeder import run_batch_feeder  # issue 7: ingest + windowed enqueue

    threading.Thread(target=run_batch_feeder, args=(settings, stop_relay), daemon=True,
                     name="genq-batch-feeder").start()
    from workers.celery_app import make_celery

    app = make_celery(served)
    queue_names = ",".join(q.name for q in job_queues(served.broker_url, served.model,
                                                      served.model_version or None))
    # Celery's banner lists only the queues its own consumer takes: none (the Worker's intake
    # takes the job queues).
    served_name = served.model + (f"@{served.model_version}" if served.model_version else "")
    console.print(f"[green]worker[/] for model {served_name} takes jobs from {queue_names}")
    argv = [
        # Celery's pool runs no job (only a direct run_job call would): one thread is enough.
        "worker", "--pool", "threads", "--concurrency", "1",
        "--exclude-queues", queue_names,
        "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    try:
        app.worker_main(argv)
    finally:
        stop_relay.set()


@click.command("webhook-worker")
@click.option("--concurrency", default=None, type=int,
              help="Requests in flight (default GENQ_WEBHOOK_CONCURRENCY).")
@click.option("--hostname", default=None, help="Celery node name.")
def webhook_worker(concurrency: int | None, hostname: str | None) -> None:
    """Run the webhook worker (signed deliveries)."""
    from workers.webhook_worker import run_webhook_worker

    settings = get_settings()
    _require_broker(settings)
    run_webhook_worker(settings, concurrency, hostname)


@click.group(name="db")
def db_group() -> None:
    """Database schema commands."""


@db_group.command()
def upgrade() -> None:
    """Create the database or upgrade its schema (Alembic)."""
    from genq import db

    url = get_settings().database_url_resolved
    db.upgrade(url)
    console.print(f"database {url} at revision {db.current_revision(url)}")

