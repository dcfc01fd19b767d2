"""The Redis batch fetcher on a real Redis: serving order, the window, acks, and kombu's own
recovery of the messages it holds (its unacked hash and index, in kombu's format)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from kombu import Connection

from genq.queues import REDIS_TRANSPORT_OPTIONS, job_queues, queue_for
from genq.settings import Settings
from genq.states import Priority
from producer.publisher import publish_job
from tests.e2e.conftest import redis_db
from workers.celery_app import make_celery
from workers.micro_batch import JobMessage
from workers.redis_fetcher import RedisJobFetcher

pytestmark = pytest.mark.integration

FETCHER_REDIS_DB = 1


class Received:
    """What the fetcher delivered, in order."""

    def __init__(self) -> None:
        self.messages: list[JobMessage] = []
        self._changed = threading.Condition()

    def __call__(self, messages: list[JobMessage]) -> None:
        with self._changed:
            self.messages.extend(messages)
            self._changed.notify_all()

    def job_ids(self) -> list[str]:
        return [message.payload[0][0] for message in self.messages]

    def wait_for(self, count: int, timeout: float = 10) -> list[str]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.messages) >= count, timeout), (
                f"{len(self.messages)}/{count} messages delivered")
        return self.job_ids()


@pytest.fixture
def broker_url(redis_url) -> str:
    url = redis_db(redis_url, FETCHER_REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def model() -> str:
    return f"fetch-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_fetcher(broker_url, model):
    fetchers: list[RedisJobFetcher] = []

    def start(window: int, received: Received, refill_at: int = 1, urgent_reserve: int = 0,
              **transport_options) -> RedisJobFetcher:
        app = make_celery(Settings(broker_url=broker_url, model=model))
        app.conf.broker_transport_options.update(transport_options)
        queues = job_queues(broker_url, model)
        fetcher = RedisJobFetcher(app, queues, window, received, refill_at=refill_at,
                                  urgent_queue=queues[0].name, urgent_reserve=urgent_reserve)
        fetcher.start()
        fetchers.append(fetcher)
        return fetcher

    yield start
    for fetcher in fetchers:
        fetcher.stop()


def _unacked(broker_url: str) -> tuple[int, int]:
    client = redis.Redis.from_url(broker_url)
    return client.hlen("unacked"), client.zcard("unacked_index")


def _eventually(condition, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_fetcher_takes_classes_in_order_up_to_its_window_and_acks_in_rounds(
        broker_url, model, start_fetcher):
    # given messages of every class at two share levels, published against serving order
    serving_order = [(priority, level) for priority in Priority for level in (0, 2)]
    for priority, level in reversed(serving_order):
        publish_job(broker_url, f"{priority.value}-{level}", queue_for(model, priority), level)
    expected = [f"{priority.value}-{level}" for priority, level in serving_order]

    # when a fetcher with a window of 4 starts
    received = Received()
    start_fetcher(4, received)

    # then it holds the 4 first in serving order, each recorded as unacked, and no more
    assert received.wait_for(4) == expected[:4]
    time.sleep(0.3)
    assert len(received.messages) == 4
    assert _unacked(broker_url) == (4, 4)

    # when two of them are settled, the next two come, and the acked ones leave the index
    received.messages[0].ack()
    received.messages[1].ack()
    assert received.wait_for(6) == expected
    for message in received.messages[2:]:
        message.ack()
    assert _eventually(lambda: _unacked(broker_url) == (0, 0))


def test_with_refill_at_the_fetcher_waits_for_that_many_free_slots_and_acks_with_them(
        broker_url, model, start_fetcher):
    # given 12 queued jobs and a fetcher holding 8, which refills once 3 slots are free
    for index in range(12):
        publish_job(broker_url, f"job-{index}", queue_for(model, Priority.BATCH))
    received = Received()
    start_fetcher(8, received, refill_at=3)
    assert received.wait_for(8) == [f"job-{index}" for index in range(8)]

    # when two jobs are settled, nothing moves: no new message, and their acks wait
    received.messages[0].ack()
    received.messages[1].ack()
    time.sleep(0.5)
    assert len(received.messages) == 8
    assert _unacked(broker_url) == (8, 8)

    # when the third is settled, one round acks all three and takes three more
    received.messages[2].ack()
    assert received.wait_for(11) == [f"job-{index}" for index in range(11)]
    assert _unacked(broker_url) == (8, 8)  # 11 taken, 3 acked (in the same atomic round)


def test_a_full_window_still_takes_interactive_jobs_into_its_reserve(broker_url, model,
                                                                   start_fetcher):
    # Regression (issue 21): with its window full of long jobs, a worker took an interactive
    # job only once enough of them had ended.
    for index in range(6):
        publish_job(broker_url, f"batch-{index}", queue_for(model, Priority.BATCH))
    received = Received()
    start_fetcher(4, received, refill_at=2, urgent_reserve=2)
    assert received.wait_for(4) == [f"batch-{index}" for index in range(4)]

    # when three interactive jobs are published while no slot is free
    published = time.monotonic()
    for index in range(3):
        publish_job(broker_url, f"urgent-{index}", queue_for(model, Priority.INTERACTIVE))

    # then two arrive at once (the reserve), and no batch job
    assert received.wait_for(6)[4:] == ["urgent-0", "urgent-1"]
    assert time.monotonic() - published < 1.0
    time.sleep(0.6)
    assert len(received.messages) == 6
    assert _unacked(broker_url) == (6, 6)


def test_a_message_published_while_the_fetcher_waits_arrives_at_once(broker_url, model,
                                                                     start_fetcher):
    received = Received()
    start_fetcher(8, received)
    time.sleep(0.3)  # the fetcher is now blocked in BRPOP on empty queues

    published = time.monotonic()
    publish_job(broker_url, "late", queue_for(model, Priority.BATCH))

    assert received.wait_for(1) == ["late"]
    assert time.monotonic() - published < 0.5
    assert _eventually(lambda: _unacked(broker_url) == (1, 1))  # recorded by the next round


def test_a_given_up_message_goes_back_to_its_queue_when_the_fetcher_closes(
        broker_url, model, start_fetcher):
    # given a job whose outcome could not be written
    publish_job(broker_url, "unlucky", queue_for(model, Priority.INTERACTIVE))
    received = Received()
    fetcher = start_fetcher(1, received)
    assert received.wait_for(1) == ["unlucky"]
    received.messages[0].give_up()

    # then its slot is free for the next message, but it stays unacked
    publish_job(broker_url, "next", queue_for(model, Priority.INTERACTIVE))
    assert received.wait_for(2) == ["unlucky", "next"]
    received.messages[1].ack()

    # and closing the fetcher hands it back to the broker, for any worker to take again
    fetcher.stop()
    fetcher.close()
    assert _unacked(broker_url) == (0, 0)
    again = Received()
    start_fetcher(1, again)
    assert again.wait_for(1) == ["unlucky"]


def test_kombu_redelivers_the_messages_of_a_fetcher_that_died(broker_url, model,
                                                              start_fetcher):
    # given a fetcher that took a job and died without acking or closing
    publish_job(broker_url, "orphan", queue_for(model, Priority.DEFAULT), 1)
    received = Received()
    fetcher = start_fetcher(1, received)
    received.wait_for(1)
    fetcher.stop()

    # when kombu's visibility-timeout restore runs (any worker's channel runs it)
    time.sleep(1.1)
    options = {**REDIS_TRANSPORT_OPTIONS, "visibility_timeout": 1}
    with Connection(broker_url, transport_options=options) as conn:
        conn.default_channel.qos.restore_visible(num=10, interval=1)

    # then the message is back in its queue, at its level, and is delivered again
    again = Received()
    start_fetcher(1, again)
    assert again.wait_for(1) == ["orphan"]
    assert again.messages[0].payload == received.messages[0].payload


def test_messages_that_are_not_run_job_calls_are_dropped(broker_url, model, start_fetcher):
    # given garbage and a message of another task ahead of a real job in the same queue
    queue = queue_for(model, Priority.DEFAULT)
    app = make_celery(Settings(broker_url=broker_url, model=model))
    redis.Redis.from_url(broker_url).lpush(queue, b"not json at all")
    app.send_task("somebody.else", args=["x"], queue=queue)
    publish_job(broker_url, "real", queue)

    # when the fetcher runs
    received = Received()
    start_fetcher(8, received)

    # then only the real job is delivered, and the foreign message is acked, not held
    assert received.wait_for(1) == ["real"]
    received.messages[0].ack()
    assert _eventually(lambda: _unacked(broker_url) == (0, 0))
    assert redis.Redis.from_url(broker_url).llen(queue) == 0
    assert len(received.messages) == 1


def test_the_private_kombu_internals_the_fetcher_relies_on_are_unchanged(broker_url, model):
    # The fetcher writes kombu's unacked hash and index itself (its Lua round) and leaves
    # their recovery to kombu: if kombu renames or reformats them, this fails before a worker
    # silently loses messages (pyproject.toml pins kombu's range for the same reason).
    import inspect
    import json

    from kombu.transport.redis import Channel

    with Connection(broker_url, transport_options=REDIS_TRANSPORT_OPTIONS) as connection:
        channel = connection.default_channel
        assert channel._q_for_pri("q", 0) == "q"
        assert channel._q_for_pri("q", 3) == f"q{Channel.sep}3"
        assert (channel.unacked_key, channel.unacked_index_key) == ("unacked", "unacked_index")
        assert "client" in inspect.signature(channel.qos.restore_by_tag).parameters
        assert {"num", "interval"} <= set(inspect.signature(
            channel.qos.restore_visible).parameters)
        assert isinstance(channel.unacked_restore_limit, int | None)
        # kombu's own consumer records a message it hands out as json [message, exchange,
        # routing_key] under its delivery tag, the format the Lua round writes
        publish_job(broker_url, "format", queue_for(model, Priority.DEFAULT))
        queue = job_queues(broker_url, model)[1]
        message = channel.basic_get(queue.name, no_ack=False)
        raw, exchange, routing_key = json.loads(
            redis.Redis.from_url(broker_url).hget("unacked", message.delivery_tag))
        assert raw["properties"]["delivery_tag"] == message.delivery_tag
        assert (exchange, routing_key) == (message.delivery_info["exchange"],
                                           message.delivery_info["routing_key"])
