"""Broker names and routing shared by the submit side (producer) and the consume side (workers).

Queues are per model, so a worker (one engine, one model) consumes only its model's jobs.
Redis: one queue per model and class (`genq.<model>.<class>`), polled in strict order. RabbitMQ:
a `genq.jobs.<model>` priority queue per model, and `genq.interactive.<model>` for its
interactive class (a worker's reserve consumer takes it beyond a full prefetch window, see
workers.intake_rabbitmq). `<model>` is `model_slug(model)`, plus `@<version>` for a job routed to
a version (genq.routing): each version has its own queues.

Inside a class, a message also carries its job's fair-share level (genq.fair_share). Class and
level make one serving rank (`serving_rank`), encoded as the message priority of each broker.
"""

from __future__ import annotations

import hashlib
import re

from kombu import Queue

from genq.fair_share import NUM_SHARE_LEVELS
from genq.states import Priority

RUN_JOB_TASK = "genq.run_job"
AMQP_JOBS_QUEUE_PREFIX = "genq.jobs"
AMQP_INTERACTIVE_QUEUE_PREFIX = "genq.interactive"  # not genq.jobs.<model>.x: models have dots
AMQP_MAX_PRIORITY = 9
# Every genq connection to Redis (publisher, worker, reaper) uses these. kombu's Redis transport
# keeps a queue's messages in one list per priority step (`<queue>\x06\x16<step>`, step 0 as
# `<queue>` itself) and has only the steps 0, 3, 6, 9 by default, rounding other priorities
# down into them: the levels of a class would merge, and counting a queue would miss lists.
# A consumer's BRPOP lists every queue's step 0 first, then every queue's step 1, and so on
# (`queue_order_strategy` orders the queues within one step only), so the classes' ranks must
# not share a step for the class order to stay strict; `serving_rank` keeps them apart.
REDIS_TRANSPORT_OPTIONS = {"priority_steps": list(range(AMQP_MAX_PRIORITY + 1)),
                           "queue_order_strategy": "priority"}

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


def queue_key(model: str, version: str | None = None) -> str:
    """The model's part of its queue names: its slug, plus `@<version>` for a version. A slug
    never contains `@`, and versions are safe names (genq.routing), so keys never collide."""
    return model_slug(model) if not version else f"{model_slug(model)}@{version}"


def queue_for(model: str, priority: Priority, version: str | None = None) -> str:
    """The logical queue of a model (version) and class, stored on outbox rows; `route` maps it
    onto the broker."""
    return f"genq.{queue_key(model, version)}.{priority.value}"


def _parse_queue(queue: str) -> tuple[str, Priority]:
    """(model slug, class) of a logical queue name made by `queue_for`."""
    prefix, _, rest = queue.partition(".")
    slug, _, priority = rest.rpartition(".")
    if prefix != "genq" or not slug:
        raise ValueError(f"{queue!r} is not a job queue name (genq.<model>.<class>)")
    return slug, Priority(priority)


def is_amqp(broker_url: str) -> bool:
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def _amqp_jobs_queue(slug: str, priority: Priority | None = None) -> Queue:
    """The model's priority queue; the interactive class's own queue with `priority`."""
    prefix = (AMQP_INTERACTIVE_QUEUE_PREFIX if priority is Priority.INTERACTIVE
              else AMQP_JOBS_QUEUE_PREFIX)
    return Queue(f"{prefix}.{slug}",
                 queue_arguments={"x-max-priority": AMQP_MAX_PRIORITY})


def job_queues(broker_url: str, model: str, version: str | None = None) -> list[Queue]:
    """The queues a worker serving `model` (`version`) consumes, in the order it must poll
    them (the interactive class's first)."""
    if is_amqp(broker_url):
        key = queue_key(model, version)
        return [_amqp_jobs_queue(key, Priority.INTERACTIVE), _amqp_jobs_queue(key)]
    return [Queue(queue_for(model, p, version)) for p in Priority]  # highest priority first


def serving_rank(priority: Priority, share_level: int) -> int:
    """0 is served first. Each class owns NUM_SHARE_LEVELS consecutive ranks (interactive 0-2,
    default 3-5, batch 6-8), so levels reorder jobs within a class and never across classes."""
    # Clamped: an outbox row written under other thresholds must still publish.
    level = min(max(share_level, 0), NUM_SHARE_LEVELS - 1)
    return priority.rank * NUM_SHARE_LEVELS + level


def route(queue: str, broker_url: str, share_level: int = 0) -> tuple[Queue, int]:
    """(broker queue, message priority) for a logical queue name and a job's share level."""
    slug, priority = _parse_queue(queue)
    rank = serving_rank(priority, share_level)
    if is_amqp(broker_url):  # RabbitMQ delivers the highest priority first
        return _amqp_jobs_queue(slug, priority), AMQP_MAX_PRIORITY - rank
    return Queue(queue), rank  # kombu's Redis transport pops the lowest step first
