"""Broker names and routing shared by the submit side (producer) and the consume side (workers).

Queues are per model, so a worker (one engine, one model) consumes only its model's jobs.
Redis has no per-message priority, so each model has one list per class (`genq.<model>.<class>`)
and workers poll them in strict order. RabbitMQ has real priority queues: one
`genq.jobs.<model>` queue per model with x-max-priority, and the class becomes the message
priority. `<model>` is `model_slug(model)`.
"""

from __future__ import annotations

import hashlib
import re

from kombu import Queue

from genq.states import Priority

RUN_JOB_TASK = "genq.run_job"
AMQP_JOBS_QUEUE_PREFIX = "genq.jobs"
AMQP_MAX_PRIORITY = 9
AMQP_MESSAGE_PRIORITY = {Priority.INTERACTIVE: 9, Priority.DEFAULT: 5, Priority.BATCH: 1}

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def model_slug(model: str) -> str:
    """The model's part of its queue names. A name of safe characters is kept as is; any other
    (`dummy:tiny-llama`, `/models/x`) is sanitized and gets `~` plus a hash of the original.
    No kept name contains `~`, so two models never share a slug (short of a hash collision).
    Why slug at all: Celery's `--queues` is comma-separated, and readable names in
    `redis-cli` and the RabbitMQ console help operators."""
    if _SAFE_NAME.fullmatch(model):
        return model
    digest = hashlib.sha256(model.encode()).hexdigest()[:10]
    return f"{_UNSAFE_CHARS.sub('-', model)[:48].strip('-')}~{digest}"


def queue_for(model: str, priority: Priority) -> str:
    """The logical queue of a model and class, stored on outbox rows; `route` maps it onto the
    broker."""
    return f"genq.{model_slug(model)}.{priority.value}"


def _parse_queue(queue: str) -> tuple[str, Priority]:
    """(model slug, class) of a logical queue name made by `queue_for`."""
    prefix, _, rest = queue.partition(".")
    slug, _, priority = rest.rpartition(".")
    if prefix != "genq" or not slug:
        raise ValueError(f"{queue!r} is not a job queue name (genq.<model>.<class>)")
    return slug, Priority(priority)


def is_amqp(broker_url: str) -> bool:
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def _amqp_jobs_queue(slug: str) -> Queue:
    return Queue(f"{AMQP_JOBS_QUEUE_PREFIX}.{slug}",
                 queue_arguments={"x-max-priority": AMQP_MAX_PRIORITY})


def job_queues(broker_url: str, model: str) -> list[Queue]:
    """The queues a worker serving `model` consumes, in the order it must poll them."""
    if is_amqp(broker_url):
        return [_amqp_jobs_queue(model_slug(model))]
    return [Queue(queue_for(model, p)) for p in Priority]  # highest priority first


def route(queue: str, broker_url: str) -> tuple[Queue, int | None]:
    """(broker queue, message priority) for a logical queue name."""
    if is_amqp(broker_url):
        slug, priority = _parse_queue(queue)
        return _amqp_jobs_queue(slug), AMQP_MESSAGE_PRIORITY[priority]
    return Queue(queue), None
