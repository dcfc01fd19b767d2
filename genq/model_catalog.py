"""The models a deployment accepts: the configured ones (GENQ_MODEL, GENQ_MODELS) and those
that live workers serve (heartbeat rows). Submits are checked against it; `GET /v1/models`
lists it. A known model with no live worker is still accepted: its jobs wait in its queue.
A job's model may pin a version (`smollm2-135m@v2`); otherwise its model's routing rule
(genq.routing) picks one at submit."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from genq import db, fleet, routing
from genq.errors import ErrorCode, GenqError
from genq.routing import RoutingRule
from genq.settings import Settings

# How long a process trusts its last read of the live workers' models. The submit path then
# reads the DB at most once per this, and only for a model that is not configured; a worker
# for a new model is accepted at most this long after its first heartbeat.
LIVE_MODELS_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class CatalogVersion:
    version: str
    weight: int  # its share in the rule in force; 0 for a version only workers serve
    live_workers: int
    queued: int  # its jobs waiting in its queue


@dataclass(frozen=True)
class CatalogModel:
    id: str
    live_workers: int
    created: int  # unix seconds: the start of its oldest live worker, 0 when none
    rule: RoutingRule | None = None
    versions: list[CatalogVersion] = field(default_factory=list)


@dataclass(frozen=True)
class _LiveModels:
    versions: frozenset[tuple[str, str | None]]  # (model, version) of the live workers
    read_at: float

    @property
    def models(self) -> frozenset[str]:
        return frozenset(model for model, _ in self.versions)


# Per database URL (tests run several deployments in one process). No lock: two threads that
# both find it stale both read, and either result is fresh.
_live_models_by_url: dict[str, _LiveModels] = {}


def configured_models(settings: Settings) -> list[str]:
    """The default model first, then GENQ_MODELS in order, without repeats."""
    names = [settings.model, *(name.strip() for name in settings.models.split(","))]
    return list(dict.fromkeys(name for name in names if name))


def resolve_model(settings: Settings, requested: str | None) -> str:
    """The model a job runs on: the requested one (default: GENQ_MODEL) if the deployment knows
    it, else a 422 `GenqError` that lists the models it knows."""
    model = requested or settings.model
    configured = configured_models(settings)
    if model in configured:  # the usual case: no DB read at all
        return model
    live = _live_models(settings).models
    if model in live:
        return model
    available = ", ".join(repr(name) for name in [*configured, *sorted(live - set(configured))])
    raise GenqError(ErrorCode.INVALID_REQUEST,
                    f"model {model!r} is not served here; available models: {available}",
                    param="model")


def resolve_version(settings: Settings, model: str, pinned: str | None, *, job_id: str,
                    tenant_id: str, metadata: Mapping[str, str]) -> str | None:
    """The version a job of `model` runs on: the pinned one if the model has it (else a 422),
    else the one its routing rule picks; None for a model without a rule."""
    rule = routing.cached_rules(settings.database_url_resolved).get(model)
    if rule is None and pinned is None:  # the usual case: an unversioned model
        return None
    live = frozenset(version for name, version in _live_models(settings).versions
                     if name == model and version is not None)
    if pinned is not None:
        known = set(rule.versions if rule else ()) | live
        if pinned not in known:
            listed = ", ".join(repr(f"{model}@{version}") for version in sorted(known))
            raise GenqError(ErrorCode.INVALID_REQUEST,
                            f"model {model!r} has no version {pinned!r}; "
                            f"its versions: {listed or 'none'}", param="model")
        return pinned
    key = routing.routing_key(rule, job_id, tenant_id, metadata)
    return routing.choose_version(rule, key, live)


def list_models(session: Session, settings: Settings) -> list[CatalogModel]:
    """Every known model (configured first) with its live workers, its rule in force and its
    versions, read now (not cached)."""
    workers = fleet.live_workers(session, settings.worker_live_seconds)
    rules = routing.current_rules(session)
    queued = fleet.queued_by_version(session)
    names = configured_models(settings)
    names += sorted({w.model for w in workers} - set(names))
    catalog = []
    for name in names:
        starts = [int(w.started_at.timestamp()) for w in workers if w.model == name]
        rule = rules.get(name)
        weights = dict(rule.weights) if rule else {}
        served = [w.model_version for w in workers if w.model == name and w.model_version]
        waiting = sorted(version for model, version in queued if model == name)
        versions = [CatalogVersion(version, weights.get(version, 0), served.count(version),
                                   queued.get((name, version), 0))
                    for version in dict.fromkeys([*weights, *sorted(served), *waiting])]
        catalog.append(CatalogModel(name, len(starts), min(starts, default=0), rule, versions))
    return catalog


def _live_models(settings: Settings) -> _LiveModels:
    url = settings.database_url_resolved
    cached = _live_models_by_url.get(url)
    if cached is not None and time.monotonic() - cached.read_at < LIVE_MODELS_TTL_SECONDS:
        return cached
    with db.session_factory(url)() as session:
        versions = frozenset(fleet.live_worker_versions(session, settings.worker_live_seconds))
    cached = _live_models_by_url[url] = _LiveModels(versions, time.monotonic())
    return cached
