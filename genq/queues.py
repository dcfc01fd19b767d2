"""Broker names and routing shared by the submit side (producer) and the consume side (workers).

Redis has no per-message priority, so each class has its own list and workers poll them in
strict order. RabbitMQ has real priority queues: one `genq.jobs` queue with x-max-priority,
and the class becomes the message priority.
"""

from __future__ import annotations

from kombu import Queue

from genq.states import Priority

RUN_JOB_TASK = "genq.run_job"
AMQP_JOBS_QUEUE = "genq.jobs"
AMQP_MAX_PRIORITY = 9
AMQP_MESSAGE_PRIORITY = {Priority.INTERACTIVE: 9, Priority.DEFAULT: 5, Priority.BATCH: 1}


def queue_for(priority: Priority) -> str:
    """The class's logical queue, stored on outbox rows; `route` maps it onto the broker."""
    return f"genq.{priority.value}"


ALL_QUEUES = [queue_for(p) for p in Priority]  # highest priority first
_PRIORITY_OF_QUEUE = {queue_for(p): p for p in Priority}


def is_amqp(broker_url: str) -> bool:
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def _amqp_jobs_queue() -> Queue:
    return Queue(AMQP_JOBS_QUEUE, queue_arguments={"x-max-priority": AMQP_MAX_PRIORITY})


def job_queues(broker_url: str) -> list[Queue]:
    """The queues a job worker consumes, in the order it must poll them."""
    if is_amqp(broker_url):
        return [_amqp_jobs_queue()]
    return [Queue(name) for name in ALL_QUEUES]


def route(queue: str, broker_url: str) -> tuple[Queue, int | None]:
    """(broker queue, message priority) for a logical queue name."""
    if is_amqp(broker_url):
        return _amqp_jobs_queue(), AMQP_MESSAGE_PRIORITY[_PRIORITY_OF_QUEUE[queue]]
    return Queue(queue), None
