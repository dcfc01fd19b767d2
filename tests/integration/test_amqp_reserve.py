"""RabbitMQ's interactive reserve on a real broker: it takes interactive jobs up to its size
while nothing is acked, one more per ack, and what it held comes back when it closes."""

from __future__ import annotations

import threading
import uuid

import pytest
from kombu import Connection

from genq.queues import job_queues, queue_for
from genq.states import Priority
from producer.publisher import publish_job
from workers.amqp_reserve import InteractiveReserve
from workers.micro_batch import JobMessage

pytestmark = pytest.mark.integration

SETTLE_SECONDS = 1.0  # how long "nothing more arrives" is watched


class Received:
    def __init__(self) -> None:
        self.messages: list[JobMessage] = []
        self._changed = threading.Condition()

    def __call__(self, message: JobMessage) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> list[str]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.messages) >= count, timeout)
            return [message.payload[0][0] for message in self.messages]


@pytest.fixture
def model(rabbitmq_url) -> str:
    name = f"reserve-{uuid.uuid4().hex[:8]}"
    yield name
    with Connection(rabbitmq_url) as connection:
        for queue in job_queues(rabbitmq_url, name):
            queue(connection.channel()).delete()


def _reserve(rabbitmq_url: str, model: str, received: Received) -> InteractiveReserve:
    reserve = InteractiveReserve(rabbitmq_url, job_queues(rabbitmq_url, model)[0], 2, received)
    reserve.start()
    return reserve


def test_the_reserve_holds_at_most_its_size_and_takes_one_more_per_ack(rabbitmq_url, model):
    # given three interactive jobs waiting, and a reserve of 2
    for index in range(3):
        publish_job(rabbitmq_url, f"urgent-{index}", queue_for(model, Priority.INTERACTIVE))
    received = Received()
    reserve = _reserve(rabbitmq_url, model, received)
    try:
        # when nothing is acked, then it holds two
        assert received.wait_for(2) == ["urgent-0", "urgent-1"]
        assert received.wait_for(3, timeout=SETTLE_SECONDS) == ["urgent-0", "urgent-1"]
        # when one is acked (from another thread, as the runner does), then the third comes
        received.messages[0].ack()
        assert received.wait_for(3) == ["urgent-0", "urgent-1", "urgent-2"]
        for message in received.messages[1:]:
            message.ack()
    finally:
        reserve.stop()
        reserve.close()
    # and nothing is left in the queue once all were acked
    with Connection(rabbitmq_url) as connection:
        queue = job_queues(rabbitmq_url, model)[0](connection.channel())
        assert queue.queue_declare(passive=True).message_count == 0


def test_jobs_a_closed_reserve_held_unacked_go_back_to_the_queue(rabbitmq_url, model):
    # given a reserve that holds two interactive jobs and acks one
    for index in range(2):
        publish_job(rabbitmq_url, f"urgent-{index}", queue_for(model, Priority.INTERACTIVE))
    received = Received()
    reserve = _reserve(rabbitmq_url, model, received)
    assert received.wait_for(2) == ["urgent-0", "urgent-1"]
    received.messages[0].ack()

    # when it stops and closes (a worker's drain ended with the other job handed back)
    reserve.stop()
    reserve.close()

    # then the unacked one is delivered again, to the next consumer
    again = Received()
    second = _reserve(rabbitmq_url, model, again)
    try:
        assert again.wait_for(1) == ["urgent-1"]
        assert again.wait_for(2, timeout=SETTLE_SECONDS) == ["urgent-1"]
        again.messages[0].ack()
    finally:
        second.stop()
        second.close()
