"""The intake interface on both real brokers: what `take` hands over, that an acked delivery is
never delivered again, a given-up one is, and `close` hands back every unsettled one."""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection

from genq.queues import job_queues, queue_for
from genq.settings import Settings
from genq.states import Priority
from producer.publisher import publish_job
from tests.e2e.conftest import parametrized_broker_url
from workers.celery_app import make_celery
from workers.intake import Intake, open_intake

pytestmark = pytest.mark.integration

INTAKE_REDIS_DB = 2
SETTLE_SECONDS = 0.5  # how long "nothing more arrives" is watched


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request) -> str:
    return parametrized_broker_url(request, INTAKE_REDIS_DB)


@pytest.fixture
def model(broker_url) -> str:
    name = f"intake-{uuid.uuid4().hex[:8]}"
    yield name
    if broker_url.startswith("amqp"):
        with Connection(broker_url) as connection:
            for queue in job_queues(broker_url, name):
                queue(connection.channel()).delete()


@pytest.fixture
def open_one(broker_url, model):
    """Opens intakes of the model's queues (window 8); closes them at the end."""
    intakes: list[Intake] = []

    def open_one() -> Intake:
        settings = Settings(broker_url=broker_url, model=model)
        intake = open_intake(make_celery(settings), settings, window=8)
        intakes.append(intake)
        return intake

    yield open_one
    for intake in intakes:
        intake.close()


def _publish(broker_url: str, model: str, *job_ids: str,
             priority: Priority = Priority.DEFAULT) -> None:
    for job_id in job_ids:
        publish_job(broker_url, job_id, queue_for(model, priority))


def _take_all(intake: Intake, count: int, timeout: float = 10, **kwargs) -> list:
    """Take until `count` deliveries arrived (or `timeout`), then watch for more."""
    taken, deadline = [], time.monotonic() + timeout
    while len(taken) < count and time.monotonic() < deadline:
        taken += intake.take(count - len(taken), 0.2, **kwargs)
    taken += intake.take(8, SETTLE_SECONDS, **kwargs)
    return taken


def test_take_hands_over_at_most_n_and_waits_for_a_late_message(broker_url, model, open_one):
    _publish(broker_url, model, "a", "b", "c")
    intake = open_one()

    first = []
    deadline = time.monotonic() + 10
    while not first and time.monotonic() < deadline:
        first = intake.take(2, 0.5)
    assert 1 <= len(first) <= 2
    rest = _take_all(intake, 3 - len(first))
    assert sorted(d.job_id for d in first + rest) == ["a", "b", "c"]

    # when nothing is queued, take waits up to its timeout for a message published meanwhile
    assert intake.take(4, 0.3) == []
    _publish(broker_url, model, "late")
    waited = time.monotonic()
    late = intake.take(4, 5)
    assert [d.job_id for d in late] == ["late"] and time.monotonic() - waited < 2


def test_an_acked_delivery_never_comes_back(broker_url, model, open_one):
    _publish(broker_url, model, "done")
    intake = open_one()
    [delivery] = _take_all(intake, 1)

    intake.ack(delivery)
    intake.take(0, 0)  # sends the ack
    intake.close()

    assert _take_all(open_one(), 1, timeout=2) == []


def test_a_given_up_delivery_comes_back(broker_url, model, open_one):
    _publish(broker_url, model, "unlucky")
    intake = open_one()
    [delivery] = _take_all(intake, 1)

    intake.give_up(delivery)

    [again] = _take_all(intake, 1)
    assert again.job_id == "unlucky"
    intake.ack(again)


def test_close_hands_back_every_unsettled_delivery(broker_url, model, open_one):
    # given an intake holding three deliveries: one acked, one given up, one unsettled
    _publish(broker_url, model, "acked", "given-up", "held")
    intake = open_one()
    taken = {d.job_id: d for d in _take_all(intake, 3)}
    intake.ack(taken["acked"])
    intake.give_up(taken["given-up"])

    # when it closes
    intake.close()

    # then the next intake gets the two not acked, and nothing else
    assert sorted(d.job_id for d in _take_all(open_one(), 2)) == ["given-up", "held"]


def test_interactive_only_takes_only_the_interactive_queue(broker_url, model, open_one):
    _publish(broker_url, model, "batch", priority=Priority.BATCH)
    _publish(broker_url, model, "urgent", priority=Priority.INTERACTIVE)
    intake = open_one()

    assert [d.job_id for d in _take_all(intake, 1, interactive_only=True)] == ["urgent"]
