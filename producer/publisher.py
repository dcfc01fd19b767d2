"""Publish "run this job" messages to the broker, failing fast when the broker is down.

A failed publish is never fatal: the job and its outbox row are already committed, and the
outbox relay (producer.outbox) publishes the row later.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu import Connection, Producer
from kombu.utils.uuid import uuid

from genq.queues import REDIS_TRANSPORT_OPTIONS, RUN_JOB_TASK, is_amqp, route
from producer.redis_transport import publishing_transport

CONNECT_TIMEOUT_SECONDS = 1.0
SOCKET_TIMEOUT_SECONDS = 2.0
# One quick retry covers a dropped pooled connection; a broker that is really down fails the
# publish within about two seconds instead of blocking the HTTP request.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.2}
# Redis commands per pipelined round trip of a bulk publish: a few hundred KB at most.
PUBLISH_BATCH_SIZE = 500
TRANSPORT_OPTIONS = {"socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
                     "socket_timeout": SOCKET_TIMEOUT_SECONDS}


class BrokerNotConfigured(RuntimeError):
    pass


@lru_cache(maxsize=8)
def producer_app(broker_url: str) -> Celery:
    """One Celery app (and so one connection pool) per process and broker URL."""
    if not broker_url:
        raise BrokerNotConfigured("no broker URL configured (set GENQ_BROKER_URL)")
    app = Celery("genq-producer", broker=broker_url)
    app.conf.update(
        # Redis: one redis-py client per channel instead of one per publish.
        broker_transport=publishing_transport(broker_url),
        broker_connection_timeout=CONNECT_TIMEOUT_SECONDS,
        broker_connection_retry=False,
        # RabbitMQ: publisher confirms, so a message lost with a dropping connection raises
        # (the outbox row stays unsent and the relay retries) instead of counting as sent.
        broker_transport_options={**TRANSPORT_OPTIONS, **REDIS_TRANSPORT_OPTIONS,
                                  "confirm_publish": is_amqp(broker_url)},
        task_ignore_result=True,
    )
    return app


class RunMessage(NamedTuple):
    """A job's "run" message: the job, its logical queue (genq.queues) and fair-share level."""

    job_id: str
    queue: str
    share_level: int = 0


def publish_job(broker_url: str, job_id: str, queue: str, share_level: int = 0) -> None:
    """Send the job's message to `queue` at its fair-share level; raises (quickly) when the
    broker cannot take it."""
    publish_jobs(broker_url, [RunMessage(job_id, queue, share_level)])


def publish_jobs(broker_url: str, messages: Sequence[RunMessage]) -> None:
    """Send the messages over one pooled connection; raises (quickly) when the broker cannot
    take them, and then some of them may have been sent (their outbox rows stay unsent and the
    relay sends them again: a duplicate message is harmless, claims are conditional).

    On Redis they go out pipelined, PUBLISH_BATCH_SIZE commands per round trip (kombu's publish
    batch; the pool reconnects a dropped connection, but a failed flush is not retried), a lone
    one as one command. On
    RabbitMQ each is published and confirmed in turn, retried per PUBLISH_RETRY_POLICY."""
    app = producer_app(broker_url)
    routes = [_broker_route(message.queue, broker_url, message.share_level)
              for message in messages]
    origin = anon_nodename()  # the sender's host and pid, as Celery would name it
    # Not on Redis: there the redis-py client's pool replaces a dropped connection itself (a
    # batched publish only queues the message), and kombu's retry wrapper cost a fifth of a
    # publish.
    retry = is_amqp(broker_url)
    with app.producer_pool.acquire(block=True) as producer:
        for broker_queue in {broker_queue for broker_queue, _ in routes}:
            # kombu's own check (hash in the connection's declared set, emptied when it
            # reconnects), made before maybe_declare binds a copy of the queue to the channel.
            if hash(broker_queue) not in producer.connection.declared_entities:
                producer.maybe_declare(broker_queue, retry=True, **PUBLISH_RETRY_POLICY)
        if len(messages) == 1:  # a single submit's: one LPUSH costs less than a pipeline
            (broker_queue, priority), = routes
            _publish_task(app, producer, origin, messages[0].job_id, broker_queue.name,
                          priority, retry)
            return
        with producer.batch(PUBLISH_BATCH_SIZE):
            for message, (broker_queue, priority) in zip(messages, routes, strict=True):
                _publish_task(app, producer, origin, message.job_id, broker_queue.name,
                              priority, retry)


def _publish_task(app: Celery, producer: Producer, origin: str, job_id: str,
                  broker_queue: str, priority: int, retry: bool) -> None:
    """Publish the task message Celery's `send_task` would, without its per-call routing,
    signals and producer acquisition: the message is built by Celery's own protocol-2 builder
    and published as `send_task` publishes it with Celery's defaults (JSON, persistent, to the
    default exchange for a direct queue)."""
    headers, properties, body, _ = app.amqp.as_task_v2(
        uuid(), RUN_JOB_TASK, [job_id], ignore_result=True, origin=origin,
        argsrepr=repr([job_id]), kwargsrepr="{}")
    producer.publish(
        body, exchange="", routing_key=broker_queue, priority=priority, headers=headers,
        serializer="json", delivery_mode="persistent", retry=retry,
        retry_policy=PUBLISH_RETRY_POLICY, **properties)


# Routes (and the kombu Queue objects in them) are the same for every job of a queue and level.
_broker_route = lru_cache(maxsize=1024)(route)


def check_broker(broker_url: str, timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached within `timeout` seconds (for /readyz)."""
    if not broker_url:
        raise BrokerNotConfigured("no broker URL configured (set GENQ_BROKER_URL)")
    options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    with Connection(broker_url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                               timeout=timeout)
