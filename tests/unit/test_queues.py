"""Queue names per model and class: safe for the brokers and Celery's --queues, one model per
name, and routed to the right broker queue and message priority (class and share level)."""

import re

import pytest

from genq.fair_share import NUM_SHARE_LEVELS
from genq.queues import (
    AMQP_MAX_PRIORITY,
    REDIS_TRANSPORT_OPTIONS,
    is_amqp,
    job_queues,
    model_slug,
    queue_for,
    route,
)
from genq.states import Priority

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def test_a_plain_model_name_is_its_own_slug():
    assert model_slug("smollm2-135m") == "smollm2-135m"
    assert queue_for("smollm2-135m", Priority.BATCH) == "genq.smollm2-135m.batch"


@pytest.mark.parametrize("models", [
    ("dummy:tiny-llama", "dummy/tiny-llama", "dummy-tiny-llama", "dummy tiny-llama"),
    ("/models/a/config.json", "/models/a:config.json", "x" * 200, "x" * 201),
])
def test_names_that_sanitize_alike_keep_distinct_safe_slugs(models):
    slugs = [model_slug(model) for model in models]
    assert len(set(slugs)) == len(models)
    assert all(re.fullmatch(r"[A-Za-z0-9._~-]{1,64}", slug) for slug in slugs), slugs


def test_a_name_shaped_like_a_slug_does_not_take_that_slug():
    slug = model_slug("dummy:tiny-llama")
    assert "~" in slug and model_slug(slug) != slug


def test_redis_workers_poll_their_models_classes_highest_first():
    assert [q.name for q in job_queues(REDIS, "m")] == ["genq.m.interactive", "genq.m.default",
                                                        "genq.m.batch"]
    assert route("genq.m.batch", REDIS)[0] == job_queues(REDIS, "m")[2]


def test_rabbitmq_has_a_priority_queue_per_model_and_one_for_its_interactive_class():
    # (the interactive one is what a worker's reserve consumer takes beyond a full window)
    model = "dummy:tiny-llama"
    interactive, queue = job_queues(AMQP, model)
    assert queue.name == f"genq.jobs.{model_slug(model)}"
    assert interactive.name == f"genq.interactive.{model_slug(model)}"
    assert {q.queue_arguments["x-max-priority"] for q in (queue, interactive)} == {
        AMQP_MAX_PRIORITY}
    assert route(queue_for(model, Priority.INTERACTIVE), AMQP)[0] == interactive
    for priority in (Priority.DEFAULT, Priority.BATCH):
        assert route(queue_for(model, priority), AMQP)[0] == queue
    assert route(queue_for("other", Priority.DEFAULT), AMQP)[0].name == "genq.jobs.other"


def test_a_queue_name_from_before_models_is_refused_on_rabbitmq():
    with pytest.raises(ValueError):
        route("genq.default", AMQP)


def test_rabbitmq_priority_is_the_class_band_minus_the_share_level():
    bands = {priority: [route(queue_for("m", priority), AMQP, level)[1]
                        for level in range(NUM_SHARE_LEVELS)] for priority in Priority}
    assert bands == {Priority.INTERACTIVE: [9, 8, 7], Priority.DEFAULT: [6, 5, 4],
                     Priority.BATCH: [3, 2, 1]}


@pytest.mark.parametrize("broker_url", [REDIS, AMQP])
def test_share_levels_reorder_within_a_class_and_never_across_classes(broker_url):
    # RabbitMQ serves the highest message priority first, kombu's Redis transport the lowest.
    def served_first(pair: tuple[Priority, int]) -> int:
        priority = route(queue_for("m", pair[0]), broker_url, pair[1])[1]
        return -priority if is_amqp(broker_url) else priority

    pairs = [(priority, level) for priority in Priority for level in range(NUM_SHARE_LEVELS)]
    assert sorted(reversed(pairs), key=served_first) == pairs
    # and every pair has a priority of its own, one the broker keeps apart from the others
    priorities = {route(queue_for("m", p), broker_url, level)[1] for p, level in pairs}
    assert len(priorities) == len(pairs)
    assert priorities <= set(REDIS_TRANSPORT_OPTIONS["priority_steps"])
    assert priorities <= set(range(AMQP_MAX_PRIORITY + 1))


def test_a_level_out_of_range_stays_inside_its_class():
    assert route("genq.m.default", AMQP, 7)[1] == route("genq.m.default", AMQP, 2)[1]
    assert route("genq.m.default", REDIS, -1)[1] == route("genq.m.default", REDIS, 0)[1]
