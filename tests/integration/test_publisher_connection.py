"""The producer's Redis publishes share one redis-py client per channel
(producer.redis_transport): it must publish as a fresh client would, through dropped
connections, a Redis restart and an outage."""

from __future__ import annotations

import time

import pytest
import redis
from kombu.exceptions import KombuError

from genq.queues import queue_for
from genq.states import Priority
from producer.publisher import producer_app, publish_job
from producer.redis_transport import PublishingTransport, publishing_transport
from tests.chaos.conftest import PrivateRedis
from tests.conftest import redis_queue_messages

QUEUE = queue_for("echo", Priority.DEFAULT)


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _publish_client(broker_url: str) -> redis.Redis:
    with producer_app(broker_url).producer_pool.acquire(block=True) as producer:
        return producer.channel._publish_client


def test_one_client_publishes_every_message_of_a_channel(private_redis):
    # Given a job already published
    publish_job(private_redis.url, "job_first", QUEUE)
    client = _publish_client(private_redis.url)

    # When more are published
    for index in range(3):
        publish_job(private_redis.url, f"job_{index}", QUEUE)

    # Then the same client sent them, and every message is in the queue
    assert _publish_client(private_redis.url) is client
    assert len(redis_queue_messages(private_redis.url, QUEUE)) == 4


def test_a_dropped_connection_is_replaced_at_the_next_publish(private_redis):
    # Given a publisher whose pooled connection the server has closed
    publish_job(private_redis.url, "job_before", QUEUE)
    server = redis.Redis.from_url(private_redis.url)
    assert server.client_kill_filter(_type="normal", skipme=True) >= 1

    # When it publishes again
    publish_job(private_redis.url, "job_after", QUEUE)

    # Then the message arrives
    messages = redis_queue_messages(private_redis.url, QUEUE)
    assert any(b"job_after" in message for message in messages)


def test_publishes_fail_fast_while_redis_is_down_and_resume_when_it_returns(private_redis):
    # Given a publisher that has published (its client and pool are warm)
    publish_job(private_redis.url, "job_before", QUEUE)

    # When Redis goes down, a publish raises at once instead of hanging
    private_redis.stop()
    started = time.monotonic()
    with pytest.raises((KombuError, redis.RedisError)):
        publish_job(private_redis.url, "job_during", QUEUE)
    assert time.monotonic() - started < 2.5

    # And when Redis is back (empty: no persistence), the next publish goes through
    private_redis.start()
    publish_job(private_redis.url, "job_after", QUEUE)
    messages = redis_queue_messages(private_redis.url, QUEUE)
    assert len(messages) == 1 and b"job_after" in messages[0]


@pytest.mark.parametrize(("url", "transport"), [
    ("redis://127.0.0.1:6379/0", PublishingTransport),
    ("rediss://127.0.0.1:6380/0", PublishingTransport),
    ("amqp://guest:guest@127.0.0.1:5672//", None),
    ("sentinel://127.0.0.1:26379", None),
])
def test_only_plain_redis_urls_publish_through_the_shared_client(url, transport):
    assert publishing_transport(url) is transport
