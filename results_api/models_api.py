"""`GET /v1/models` (OpenAI shape): every model this deployment accepts (genq.model_catalog),
with how many live workers (heartbeats) serve it now. A model with none is listed as
`"status": "no_live_worker"`: its jobs are accepted and wait in the queue for a worker.
A model with a routing rule (genq.routing) lists its versions, weights and live workers, and
says where a version without live workers sends its share (`when_unserved`)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from genq import db, model_catalog
from genq.model_catalog import CatalogModel
from results_api.context import authenticate, current_settings

bp = Blueprint("models", __name__, url_prefix="/v1")
bp.before_request(authenticate)


@bp.get("/models")
def list_models() -> Response:
    settings = current_settings()
    with db.session_factory(settings.database_url_resolved)() as session:
        catalog = model_catalog.list_models(session, settings)
    return jsonify(object="list", data=[
        {"id": model.id, "object": "model", "created": model.created, "owned_by": "genq",
         "live_workers": model.live_workers,
         "status": "available" if model.live_workers else "no_live_worker",
         **_versions(model)}
        for model in catalog
    ])


def _versions(model: CatalogModel) -> dict:
    if not model.versions:
        return {}
    rule = model.rule
    return {
        "routing": None if rule is None else {
            "sticky": rule.sticky, "when_unserved": rule.when_unserved,
            "created_at": int(rule.created_at.timestamp()) if rule.created_at else None},
        "versions": [{"version": v.version, "weight": v.weight, "live_workers": v.live_workers,
                      "queued": v.queued,
                      "status": "available" if v.live_workers else "no_live_worker"}
                     for v in model.versions],
    }
