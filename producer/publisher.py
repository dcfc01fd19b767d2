"""Publish "run this job" messages to the broker, failing fast when the broker is down.

A failed publish is never fatal: the job and its outbox row are already committed, and the
outbox relay (producer.outbox) publishes the row later.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Connection

from genq.queues import REDIS_TRANSPORT_OPTIONS, RUN_JOB_TASK, is_amqp, route

CONNECT_TIMEOUT_SECONDS = 1.0
SOCKET_TIMEOUT_SECONDS = 2.0
# One quick retry covers a dropped pooled connection; a broker that is really down fails the
# publish within about two seconds instead of blocking the HTTP request.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.2}
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
        broker_connection_timeout=CONNECT_TIMEOUT_SECONDS,
        broker_connection_retry=False,
        # RabbitMQ: publisher confirms, so a message lost with a dropping connection raises
        # (the outbox row stays unsent and the relay retries) instead of counting as sent.
        broker_transport_options={**TRANSPORT_OPTIONS, **REDIS_TRANSPORT_OPTIONS,
                                  "confirm_publish": is_amqp(broker_url)},
        task_ignore_result=True,
    )
    return app


def publish_job(broker_url: str, job_id: str, queue: str, share_level: int = 0) -> None:
    """Send the job's message to `queue` at its fair-share level; raises (quickly) when the
    broker cannot take it."""
    broker_queue, priority = route(queue, broker_url, share_level)
    producer_app(broker_url).send_task(
        RUN_JOB_TASK,
        args=[job_id],
        queue=broker_queue,
        priority=priority,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


def check_broker(broker_url: str, timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached within `timeout` seconds (for /readyz)."""
    if not broker_url:
        raise BrokerNotConfigured("no broker URL configured (set GENQ_BROKER_URL)")
    options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    with Connection(broker_url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                               timeout=timeout)
