"""How job messages reach a worker, whatever the broker: `take` a micro-batch, `ack` each once its
job's outcome is committed, `give_up` on one to have it delivered again, `close` to hand back
the rest. Adapters: workers.intake_redis (Redis) and workers.intake_rabbitmq (RabbitMQ)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from celery import Celery

from genq.queues import is_amqp, job_queues
from genq.settings import Settings

log = logging.getLogger(__name__)

# Interactive jobs a worker takes beyond its full window: an interactive job never waits for a
# wave of long jobs to end.
INTERACTIVE_RESERVE = 4


@dataclass(frozen=True, eq=False)
class Delivery:
    """One broker message for a job. `handle` is the adapter's own (a delivery tag, a kombu
    message): only the intake that took the delivery may settle it."""

    job_id: str
    handle: object


class Intake(Protocol):
    """`take` runs on one thread (the worker's intake thread); `ack` and `give_up` may be called
    from any thread, once per delivery; `close` once, after the last `take`."""

    def take(self, n: int, timeout: float, *, interactive_only: bool = False
             ) -> list[Delivery]:
        """Up to `n` deliveries, waiting up to `timeout` seconds for the first (0: don't
        wait). `interactive_only`: from the interactive queue only (the reserve beyond a full
        window). Also sends what `ack` and `give_up` asked for since the last call. Raises the
        broker's errors; the next call tries again."""
        ...

    def ack(self, delivery: Delivery) -> None:
        """The job's outcome is committed: this message is never delivered again."""
        ...

    def give_up(self, delivery: Delivery) -> None:
        """Hand the message back: it is delivered again (to this worker or another)."""
        ...

    def close(self) -> None:
        """Send the pending acks, hand back every delivery not acked, release the connection."""
        ...


def job_id_of(body: object) -> str:
    """The job id of a run_job call, from Celery's protocol-2 body `[args, kwargs, embed]`;
    ValueError for anything else (it would fail the same way on any worker: drop it)."""
    try:
        args, _kwargs, _embed = body
        job_id = args[0]
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"not a run_job call: {exc}") from exc
    if not isinstance(job_id, str):
        raise ValueError(f"job id {job_id!r} is not a string")
    return job_id


def open_intake(app: Celery, settings: Settings, window: int) -> Intake:
    """The intake of this worker's job queues (those of the model and version it serves),
    holding at most `window` messages plus the interactive reserve."""
    queues = job_queues(settings.broker_url_resolved, settings.model,
                        settings.model_version or None)
    if is_amqp(settings.broker_url_resolved):
        from workers.intake_rabbitmq import RabbitMQIntake

        return RabbitMQIntake(settings.broker_url_resolved, queues, window,
                              reserve=INTERACTIVE_RESERVE)
    from workers.intake_redis import RedisIntake

    return RedisIntake(app, queues)
