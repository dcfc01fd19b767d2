"""Canary routing rules (genq.routing): weights, sticky keys, versions without workers, pinned
names and the parsing of `genq models route` arguments. Pure functions, no services."""

from __future__ import annotations

from collections import Counter

import pytest

from genq.queues import job_queues, queue_for, route
from genq.routing import (
    REROUTE,
    WAIT,
    RoutingRule,
    RuleError,
    choose_version,
    parse_sticky,
    parse_weights,
    routing_key,
    split_pinned,
)
from genq.states import Priority

BOTH_LIVE = frozenset({"v1", "v2"})


def _shares(rule: RoutingRule, keys: list[str], live=BOTH_LIVE) -> Counter:
    return Counter(choose_version(rule, key, live) for key in keys)


def test_weights_split_jobs_in_their_proportion():
    rule = RoutingRule("m", (("v1", 90), ("v2", 10)))

    shares = _shares(rule, [f"job_{n}" for n in range(10_000)])

    assert 8_800 <= shares["v1"] <= 9_200 and shares["v1"] + shares["v2"] == 10_000


def test_a_zero_weight_version_gets_no_job():
    rule = RoutingRule("m", (("v1", 100), ("v2", 0)))

    assert _shares(rule, [f"job_{n}" for n in range(1000)]) == {"v1": 1000}


def test_sticky_tenant_keeps_each_tenant_on_one_version_and_spreads_tenants():
    rule = RoutingRule("m", (("v1", 50), ("v2", 50)), sticky="tenant")

    per_tenant = {tenant: {choose_version(rule, routing_key(rule, f"job_{n}", tenant, {}),
                                          BOTH_LIVE) for n in range(50)}
                  for tenant in (f"ten_{t}" for t in range(40))}

    assert all(len(versions) == 1 for versions in per_tenant.values())
    assert Counter(v for (v,) in per_tenant.values()).keys() == {"v1", "v2"}


def test_sticky_field_reads_the_metadata_and_falls_back_to_the_job_id():
    rule = RoutingRule("m", (("v1", 50), ("v2", 50)), sticky="field:user")

    assert routing_key(rule, "job_1", "ten_a", {"user": "alice"}) == "field:alice"
    assert routing_key(rule, "job_1", "ten_a", {}) == "job_1"


def test_a_sticky_key_keeps_its_version_when_the_canary_grows():
    # Given keys on v2 at 10%, when v2 grows to 30%: none of them moves back to v1.
    small = RoutingRule("m", (("v1", 90), ("v2", 10)), sticky="tenant")
    large = RoutingRule("m", (("v1", 70), ("v2", 30)), sticky="tenant")
    keys = [f"tenant:ten_{n}" for n in range(2000)]

    on_canary = [key for key in keys if choose_version(small, key, BOTH_LIVE) == "v2"]

    assert on_canary and all(choose_version(large, key, BOTH_LIVE) == "v2" for key in on_canary)


def test_an_unserved_version_share_is_rerouted_by_default():
    rule = RoutingRule("m", (("v1", 50), ("v2", 50)))

    assert _shares(rule, [f"job_{n}" for n in range(200)], frozenset({"v1"})) == {"v1": 200}


def test_an_unserved_version_share_waits_when_the_rule_says_so():
    rule = RoutingRule("m", (("v1", 50), ("v2", 50)), when_unserved=WAIT)

    shares = _shares(rule, [f"job_{n}" for n in range(200)], frozenset({"v1"}))

    assert shares["v2"] > 50


def test_with_no_live_version_at_all_the_weights_stand():
    rule = RoutingRule("m", (("v1", 50), ("v2", 50)), when_unserved=REROUTE)

    assert set(_shares(rule, [f"job_{n}" for n in range(200)], frozenset())) == BOTH_LIVE


@pytest.mark.parametrize(("name", "expected"), [
    ("smollm2-135m@v2", ("smollm2-135m", "v2")),
    ("smollm2-135m", ("smollm2-135m", None)),
    ("dummy:tiny-llama@2024.1", ("dummy:tiny-llama", "2024.1")),
    ("@v2", ("@v2", None)),
    ("m@", ("m@", None)),
    ("m@bad version", ("m@bad version", None)),
])
def test_split_pinned(name, expected):
    assert split_pinned(name) == expected


def test_parse_weights_keeps_the_order_given():
    assert parse_weights(["v2=10", "v1=90"]) == (("v2", 10), ("v1", 90))


@pytest.mark.parametrize("items", [[], ["v1"], ["v1=x"], ["v1=-5"], ["v1=0"], ["v1=1", "v1=2"],
                                   ["bad version=3"]])
def test_parse_weights_refuses_bad_rules(items):
    with pytest.raises(RuleError):
        parse_weights(items)


@pytest.mark.parametrize("value", ["user", "field:", "tenants"])
def test_parse_sticky_refuses_unknown_keys(value):
    with pytest.raises(RuleError):
        parse_sticky(value)


def test_main_version_is_the_heaviest_then_the_first():
    assert RoutingRule("m", (("v1", 10), ("v2", 90))).main_version == "v2"
    assert RoutingRule("m", (("v1", 50), ("v2", 50))).main_version == "v1"


def test_each_version_has_its_own_queues_and_unversioned_ones_are_unchanged():
    assert queue_for("m", Priority.DEFAULT) == "genq.m.default"
    assert queue_for("m", Priority.DEFAULT, "v2") == "genq.m@v2.default"
    assert route(queue_for("m", Priority.BATCH, "v2"), "amqp://x")[0].name == "genq.jobs.m@v2"
    assert [q.name for q in job_queues("redis://x", "m", "v2")] == [
        "genq.m@v2.interactive", "genq.m@v2.default", "genq.m@v2.batch"]
    assert [q.name for q in job_queues("amqp://x", "m")] == ["genq.interactive.m",
                                                             "genq.jobs.m"]
    assert [q.name for q in job_queues("amqp://x", "m", "v2")] == ["genq.interactive.m@v2",
                                                                   "genq.jobs.m@v2"]
