"""The Celery application of genq workers: `make_celery(settings)` for `genq worker`, which
passes its settings explicitly, and a module-level `app` from the environment's settings for
Celery's own commands (`celery -A workers.celery_app inspect ping`).

Delivery settings, and why:
- run_job messages do not go through Celery's pool or consumer: the Worker (workers.worker,
  started by the bootstep of workers.tasks) takes them through its intake (workers.intake) in
  micro-batches, and acks each only after its job's result is committed. A worker killed
  mid-job leaves its messages unacked, so the broker delivers them again. Celery's consumer
  takes no job queue (`genq worker` excludes them); it serves Celery's remote control.
  `task_acks_late` and `task_reject_on_worker_lost` say the same for any other task.
- `worker_prefetch_multiplier` (default 1) times `worker_concurrency + worker_standby_jobs` is
  how many messages a worker holds (its intake window): the engine's batch plus a few claimed
  jobs waiting in the engine's queue to refill it at the next step. That is the micro-batch
  window; a larger one only parks messages the worker cannot start.
- Redis `visibility_timeout`: an unacked message is redelivered after this long (kombu's
  restore, run by the Redis intake). It must exceed the longest job (default 1 h); the jobs table's
  lease/attempts keep a redelivery harmless.
- `task_queues`: only the queues of the model this worker serves (`settings.model`; `genq
  worker --model` sets it). Redis: the worker polls `genq.<model>.interactive`, then
  `.default`, then `.batch`, and each one's fair-share levels, strictly in that order
  (genq.queues.REDIS_TRANSPORT_OPTIONS says how). RabbitMQ: a `genq.jobs.<model>` queue with
  x-max-priority and the interactive class's `genq.interactive.<model>` (genq.queues). A
  worker of a version (`--model-version`) takes only that version's queues
  (`<model>@<version>`).
"""

from __future__ import annotations

from celery import Celery

from genq.queues import REDIS_TRANSPORT_OPTIONS, job_queues
from genq.settings import Settings, get_settings
from workers.tasks import install

REDIS_VISIBILITY_TIMEOUT_SECONDS = 3600


def make_celery(settings: Settings) -> Celery:
    # broker_url_resolved: beside `genq up` (embedded Redis) Celery's own commands find the
    # broker with no GENQ_BROKER_URL, e.g. `celery -A workers.celery_app inspect ping`.
    broker_url = settings.broker_url_resolved
    app = Celery("genq", broker=broker_url or None)
    app.genq_settings = settings  # what the Worker runs with (workers.tasks.GenqWorker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=settings.worker_prefetch_multiplier,
        task_ignore_result=True,
        task_queues=job_queues(broker_url, settings.model, settings.model_version or None),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": REDIS_VISIBILITY_TIMEOUT_SECONDS,
            **REDIS_TRANSPORT_OPTIONS,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.worker_send_events,
        # After a RabbitMQ connection drop Celery 5 lowers the prefetch count while tasks run
        # and can stay stuck there, consuming nothing (celery#9512); keep the window fixed.
        worker_enable_prefetch_count_reduction=False,
    )
    install(app)
    return app


app = make_celery(get_settings())
