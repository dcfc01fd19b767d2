"""Queue names per model and class: safe for the brokers and Celery's --queues, one model per
name, and routed to the right broker queue and message priority."""

import re

import pytest

from genq.queues import (
    AMQP_MAX_PRIORITY,
    AMQP_MESSAGE_PRIORITY,
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
    assert route("genq.m.batch", REDIS) == (job_queues(REDIS, "m")[2], None)


def test_rabbitmq_has_one_priority_queue_per_model():
    model = "dummy:tiny-llama"
    (queue,) = job_queues(AMQP, model)
    assert queue.name == f"genq.jobs.{model_slug(model)}"
    assert queue.queue_arguments == {"x-max-priority": AMQP_MAX_PRIORITY}
    for priority in Priority:
        assert route(queue_for(model, priority), AMQP) == (
            queue, AMQP_MESSAGE_PRIORITY[priority])
    assert route(queue_for("other", Priority.DEFAULT), AMQP)[0].name == "genq.jobs.other"


def test_a_queue_name_from_before_models_is_refused_on_rabbitmq():
    with pytest.raises(ValueError):
        route("genq.default", AMQP)
