"""The models a deployment accepts: the configured ones (GENQ_MODEL, GENQ_MODELS) and those
that live workers serve (heartbeat rows). Submits are checked against it; `GET /v1/models`
lists it. A known model with no live worker is still accepted: its jobs wait in its queue."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from genq import db, fleet
from genq.errors import ErrorCode, GenqError
from genq.settings import Settings

# How long a process trusts its last read of the live workers' models. The submit path then
# reads the DB at most once per this, and only for a model that is not configured; a worker
# for a new model is accepted at most this long after its first heartbeat.
LIVE_MODELS_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class CatalogModel:
    id: str
    live_workers: int
    created: int  # unix seconds: the start of its oldest live worker, 0 when none


@dataclass(frozen=True)
class _LiveModels:
    models: frozenset[str]
    read_at: float


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
    live = _live_models(settings)
    if model in live:
        return model
    available = ", ".join(repr(name) for name in [*configured, *sorted(live - set(configured))])
    raise GenqError(ErrorCode.INVALID_REQUEST,
                    f"model {model!r} is not served here; available models: {available}",
                    param="model")


def list_models(session: Session, settings: Settings) -> list[CatalogModel]:
    """Every known model (configured first) with its live workers, read now (not cached)."""
    workers = fleet.live_workers(session, settings.worker_live_seconds)
    names = configured_models(settings)
    names += sorted({w.model for w in workers} - set(names))
    catalog = []
    for name in names:
        starts = [int(w.started_at.timestamp()) for w in workers if w.model == name]
        catalog.append(CatalogModel(name, len(starts), min(starts, default=0)))
    return catalog


def _live_models(settings: Settings) -> frozenset[str]:
    url = settings.database_url_resolved
    cached = _live_models_by_url.get(url)
    if cached is not None and time.monotonic() - cached.read_at < LIVE_MODELS_TTL_SECONDS:
        return cached.models
    with db.session_factory(url)() as session:
        models = frozenset(fleet.live_worker_models(session, settings.worker_live_seconds))
    _live_models_by_url[url] = _LiveModels(models, time.monotonic())
    return models
