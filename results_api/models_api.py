"""`GET /v1/models` (OpenAI shape): the model this deployment serves, with how many live
workers (heartbeats, genq.fleet) serve it now. A model with none is listed as
`"status": "no_live_worker"`: its jobs are accepted and wait in the queue for a worker."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from genq import db, fleet
from results_api.context import authenticate, current_settings

bp = Blueprint("models", __name__, url_prefix="/v1")
bp.before_request(authenticate)


@bp.get("/models")
def list_models() -> Response:
    settings = current_settings()
    with db.session_factory(settings.database_url_resolved)() as session:
        workers = [w for w in fleet.live_workers(session, settings.worker_live_seconds)
                   if w.model == settings.model]
    created = min((int(w.started_at.timestamp()) for w in workers), default=0)
    model = {
        "id": settings.model, "object": "model", "created": created, "owned_by": "genq",
        "live_workers": len(workers),
        "status": "available" if workers else "no_live_worker",
    }
    return jsonify(object="list", data=[model])
