"""Model versions and canary routing: each model's routing rule (version -> weight, optionally
sticky per tenant or per a request field) and the choice of a job's version at submit.

Rules live in the database (genq.models.ModelRoute), newest row in force, so every API process
agrees within RULES_TTL_SECONDS. A model without a rule has no versions: its jobs and workers
stay unversioned. The choice hashes a key (the job id, or the sticky key) onto the cumulative
weights, so a sticky key keeps its version while the weights do not move past it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq import db
from genq.models import ModelRoute, utcnow

# How long a process trusts its last read of the rules: a new rule applies everywhere within it.
RULES_TTL_SECONDS = 1.0
VERSION_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
STICKY_TENANT = "tenant"
STICKY_FIELD_PREFIX = "field:"
# A version with no live worker: its share goes to the versions that have one (reroute), or
# waits in its own queue (wait). Jobs pinned to a version always wait for it.
REROUTE, WAIT = "reroute", "wait"
WHEN_UNSERVED = (REROUTE, WAIT)


class RuleError(ValueError):
    """A routing rule that cannot be set: the message says why, for the CLI's one line."""


@dataclass(frozen=True)
class RoutingRule:
    model: str
    weights: tuple[tuple[str, int], ...]  # in the order given; empty: routing off
    sticky: str | None = None
    when_unserved: str = REROUTE
    id: int | None = None
    created_at: datetime | None = None

    @property
    def versions(self) -> list[str]:
        return [version for version, _ in self.weights]

    @property
    def main_version(self) -> str | None:
        """The version with the largest weight (the first of equals)."""
        return max(self.weights, key=lambda item: item[1])[0] if self.weights else None

    def describe(self) -> str:
        weights = " ".join(f"{version}={weight}" for version, weight in self.weights) or "off"
        sticky = f" sticky={self.sticky}" if self.sticky else ""
        return f"{self.model}: {weights}{sticky} when-unserved={self.when_unserved}"


def split_pinned(name: str) -> tuple[str, str | None]:
    """`"smollm2-135m@v2"` -> ("smollm2-135m", "v2"); a name without a valid `@version` is
    returned whole."""
    model, at, version = name.rpartition("@")
    if at and model and VERSION_PATTERN.fullmatch(version):
        return model, version
    return name, None


def parse_weights(items: list[str]) -> tuple[tuple[str, int], ...]:
    """`["v1=90", "v2=10"]` -> (("v1", 90), ("v2", 10)); RuleError on a bad item."""
    weights: dict[str, int] = {}
    for item in items:
        version, equals, weight = item.partition("=")
        if not equals or not VERSION_PATTERN.fullmatch(version) or not weight.isdigit():
            raise RuleError(f"{item!r} is not VERSION=WEIGHT (e.g. v1=90; versions are "
                            "letters, digits, '.', '_' or '-')")
        if version in weights:
            raise RuleError(f"version {version!r} is given twice")
        weights[version] = int(weight)
    if not weights or sum(weights.values()) == 0:
        raise RuleError("give at least one version with a weight above 0")
    return tuple(weights.items())


def parse_sticky(value: str | None) -> str | None:
    if value is None or value == STICKY_TENANT:
        return value
    if value.startswith(STICKY_FIELD_PREFIX) and len(value) > len(STICKY_FIELD_PREFIX):
        return value
    raise RuleError(f"sticky {value!r} is neither 'tenant' nor 'field:NAME'")


def routing_key(rule: RoutingRule, job_id: str, tenant_id: str,
                metadata: Mapping[str, str]) -> str:
    """What a job's version is hashed from: its id, or its sticky key (a `field:NAME` rule
    reads the job's metadata NAME; a job without it is routed by its id)."""
    if rule.sticky == STICKY_TENANT:
        return f"tenant:{tenant_id}"
    if rule.sticky and rule.sticky.startswith(STICKY_FIELD_PREFIX):
        value = metadata.get(rule.sticky.removeprefix(STICKY_FIELD_PREFIX))
        if value is not None:
            return f"field:{value}"
    return job_id


def choose_version(rule: RoutingRule, key: str, live_versions: frozenset[str]) -> str:
    """The version of the job whose routing key is `key`, by the rule's weights."""
    weights = [(version, weight) for version, weight in rule.weights if weight > 0]
    if rule.when_unserved == REROUTE:
        # None live at all: the weights stand, and the jobs wait for whichever starts.
        weights = [item for item in weights if item[0] in live_versions] or weights
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    point *= sum(weight for _, weight in weights)
    for version, weight in weights:
        if point < weight:
            return version
        point -= weight
    return weights[-1][0]


def current_rules(session: Session) -> dict[str, RoutingRule]:
    """Every model's rule in force (its newest row), routing-off rules left out."""
    newest = select(func.max(ModelRoute.id)).group_by(ModelRoute.model)
    rows = session.scalars(select(ModelRoute).where(ModelRoute.id.in_(newest)))
    rules = (_rule_of(row) for row in rows)
    return {rule.model: rule for rule in rules if rule.weights}


def rule_history(session: Session, model: str, limit: int = 20) -> list[RoutingRule]:
    """The model's rules, newest (the one in force) first."""
    rows = session.scalars(select(ModelRoute).where(ModelRoute.model == model)
                           .order_by(ModelRoute.id.desc()).limit(limit))
    return [_rule_of(row) for row in rows]


def set_rule(session: Session, rule: RoutingRule) -> RoutingRule:
    """Put `rule` in force (a new row: the history keeps the ones before)."""
    if rule.when_unserved not in WHEN_UNSERVED:
        raise RuleError(f"when-unserved must be one of {', '.join(WHEN_UNSERVED)}")
    row = ModelRoute(model=rule.model, weights=dict(rule.weights), sticky=rule.sticky,
                     when_unserved=rule.when_unserved, created_at=utcnow())
    session.add(row)
    session.flush()
    return _rule_of(row)


def rollback(session: Session, model: str) -> RoutingRule:
    """Put 100% on the main version of the rule before the one in force."""
    history = rule_history(session, model, limit=2)
    if len(history) < 2 or not history[1].weights:
        raise RuleError(f"model {model!r} has no earlier routing rule to roll back to")
    current, previous = history
    return set_rule(session, RoutingRule(model, ((previous.main_version, 100),),
                                         current.sticky, current.when_unserved))


def _rule_of(row: ModelRoute) -> RoutingRule:
    return RoutingRule(row.model, tuple((str(v), int(w)) for v, w in row.weights.items()),
                       row.sticky, row.when_unserved, row.id, row.created_at)


@dataclass(frozen=True)
class _CachedRules:
    rules: dict[str, RoutingRule]
    read_at: float


# Per database URL (tests run several deployments in one process). No lock: two threads that
# both find it stale both read, and either result is fresh.
_rules_by_url: dict[str, _CachedRules] = {}


def cached_rules(url: str) -> dict[str, RoutingRule]:
    """`current_rules`, read at most once per RULES_TTL_SECONDS by this process."""
    cached = _rules_by_url.get(url)
    if cached is not None and time.monotonic() - cached.read_at < RULES_TTL_SECONDS:
        return cached.rules
    with db.session_factory(url)() as session:
        rules = current_rules(session)
    _rules_by_url[url] = _CachedRules(rules, time.monotonic())
    return rules
