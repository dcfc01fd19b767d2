"""The Redis intake on a real Redis: strict serving order, one round that acks and takes, and
kombu's own recovery of the messages it holds (its unacked hash and index, in kombu's format).
The interface's semantics on both brokers: tests/integration/test_intake.py."""

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
from workers.intake_redis import RedisIntake

pytestmark = pytest.mark.integration

INTAKE_REDIS_DB = 1


@pytest.fixture
def broker_url(redis_url) -> str:
    url = redis_db(redis_url, INTAKE_REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def model() -> str:
    return f"fetch-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def open_intake(broker_url, model):
    def open_intake(**transport_options) -> RedisIntake:
        app = make_celery(Settings(broker_url=broker_url, model=model))
        app.conf.broker_transport_options.update(transport_options)
        return RedisIntake(app, job_queues(broker_url, model))

    return open_intake


def _ids(deliveries) -> list[str]:
    return [delivery.job_id for delivery in deliveries]


def _unacked(broker_url: str) -> tuple[int, int]:
    client = redis.Redis.from_url(broker_url)
    return client.hlen("unacked"), client.zcard("unacked_index")


def test_take_serves_classes_in_order_and_one_round_acks_and_takes(broker_url, model,
                                                                    open_intake):
    # given messages of every class at two share levels, published against serving order
    serving_order = [(priority, level) for priority in Priority for level in (0, 2)]
    for priority, level in reversed(serving_order):
        publish_job(broker_url, f"{priority.value}-{level}", queue_for(model, priority), level)
    expected = [f"{priority.value}-{level}" for priority, level in serving_order]
    intake = open_intake()

    # when 4 are taken, then they are the 4 first in serving order, each recorded as unacked
    first = intake.take(4, 1)
    assert _ids(first) == expected[:4]
    assert _unacked(broker_url) == (4, 4)

    # when two are acked, the next take sends the acks in the round that takes the rest
    intake.ack(first[0])
    intake.ack(first[1])
    assert _unacked(broker_url) == (4, 4)
    rest = intake.take(8, 1)
    assert _ids(rest) == expected[4:]
    assert _unacked(broker_url) == (len(expected) - 2, len(expected) - 2)
    for delivery in first[2:] + rest:
        intake.ack(delivery)
    intake.take(0, 0)
    assert _unacked(broker_url) == (0, 0)
    intake.close()


def test_a_message_popped_by_the_blocking_wait_is_recorded_as_unacked(broker_url, model,
                                                                      open_intake):
    intake = open_intake()
    assert intake.take(8, 0.1) == []  # connects; the queues are empty

    publish_job(broker_url, "late", queue_for(model, Priority.BATCH))
    assert _ids(intake.take(8, 5)) == ["late"]
    assert _unacked(broker_url) == (1, 1)
    intake.close()
    assert _unacked(broker_url) == (0, 0)  # handed back: close found it unsettled


def test_kombu_redelivers_the_messages_of_an_intake_that_died(broker_url, model, open_intake):
    # given an intake that took a job and died without acking or closing
    publish_job(broker_url, "orphan", queue_for(model, Priority.DEFAULT), 1)
    assert _ids(open_intake().take(1, 1)) == ["orphan"]

    # when kombu's visibility-timeout restore runs (any worker's channel runs it)
    time.sleep(1.1)
    options = {**REDIS_TRANSPORT_OPTIONS, "visibility_timeout": 1}
    with Connection(broker_url, transport_options=options) as conn:
        conn.default_channel.qos.restore_visible(num=10, interval=1)

    # then the message is back in its queue, at its level, and is delivered again
    again = open_intake()
    assert _ids(again.take(1, 1)) == ["orphan"]
    again.close()


def test_messages_that_are_not_run_job_calls_are_dropped(broker_url, model, open_intake):
    # given garbage and a message of another task ahead of a real job in the same queue
    queue = queue_for(model, Priority.DEFAULT)
    app = make_celery(Settings(broker_url=broker_url, model=model))
    redis.Redis.from_url(broker_url).lpush(queue, b"not json at all")
    app.send_task("somebody.else", args=["x"], queue=queue)
    publish_job(broker_url, "real", queue)

    # when the intake takes
    intake = open_intake()
    [delivery] = intake.take(8, 1)

    # then only the real job is delivered, and the foreign message is acked, not held
    assert delivery.job_id == "real"
    intake.ack(delivery)
    intake.take(0, 0)
    assert _unacked(broker_url) == (0, 0)
    assert redis.Redis.from_url(broker_url).llen(queue) == 0
    intake.close()


def test_the_private_kombu_internals_the_intake_relies_on_are_unchanged(broker_url, model):
    # The intake writes kombu's unacked hash and index itself (its Lua round) and leaves
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


def test_jobs_one_at_a_time_cost_one_round_each_and_acks_ride_with_it(broker_url, model,
                                                                      open_intake):
    # given an intake whose last take emptied the queues, and a job it is running
    publish_job(broker_url, "first", queue_for(model, Priority.DEFAULT))
    intake = open_intake()
    first = intake.take(8, 1)
    client = redis.Redis.from_url(broker_url)
    client.config_resetstat()

    # when the job's ack is asked for while the next take waits, then a job arrives
    taken: list = []
    waiting = threading.Thread(target=lambda: taken.extend(intake.take(8, 5)))
    waiting.start()
    time.sleep(0.3)
    intake.ack(first[0])
    publish_job(broker_url, "second", queue_for(model, Priority.DEFAULT))
    waiting.join(10)

    # then the take waited with no round first, and the round that recorded the new job
    # sent the ack: one script call for the two
    assert _ids(taken) == ["second"]
    assert _unacked(broker_url) == (1, 1)
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
    intake.ack(taken[0])
    intake.close()
    assert _unacked(broker_url) == (0, 0)
