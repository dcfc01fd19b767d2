"""The Flask application factory. `genq api` serves it through results_api.asgi (uvicorn
workers, waits and streams on the event loop); a plain WSGI server also runs it, a thread per
wait or stream."""

from __future__ import annotations

import threading

from flask import Flask, request

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.settings import Settings
from producer.submit import load_tokenizer_cached
from results_api import (
    batches,
    breakers,
    completions,
    dashboard,
    docs,
    files,
    health,
    job_events,
    jobs,
    metrics,
    models_api,
    waits,
    webhooks,
)
from results_api.errors import register_error_handlers


def create_app(config: dict | None = None) -> Flask:
    """Build the API. Settings come from GENQ_* env vars unless config["GENQ_SETTINGS"] is
    given. Raises genq.db.SchemaOutOfDate when the database needs `genq db upgrade`."""
    app = Flask(__name__)
    app.config.update(config or {})
    if "GENQ_SETTINGS" not in app.config:
        app.config["GENQ_SETTINGS"] = Settings()
    settings: Settings = app.config["GENQ_SETTINGS"]
    db.ensure_schema_current(settings.database_url_resolved)

    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # keep the models' field order in responses
    register_error_handlers(app)
    metrics.init_app(app)  # first: its after_request hook sees every response
    breakers.init_app(app)
    waits.init_app(app, settings)
    app.before_request(_refuse_nul_in_url)
    dashboard.init_app(app, settings)
    app.register_blueprint(models_api.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(job_events.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(webhooks.bp)
    for blueprint in (files.bp, batches.bp, completions.bp):  # OpenAI-compatible
        app.register_blueprint(blueprint)
    # Load the tokenizer now, in the background, so the first submit does not wait for it.
    threading.Thread(target=load_tokenizer_cached, daemon=True, name="genq-tokenizer-warmup",
                     args=(settings.model, settings.model_cache_dir_resolved)).start()
    return app


def _refuse_nul_in_url() -> None:
    """No id genq hands out, and no query value it takes, holds a NUL character, which
    PostgreSQL cannot even compare (its driver raises): answer those before any lookup."""
    for name, value in (request.view_args or {}).items():
        if "\x00" in str(value):
            raise GenqError(ErrorCode.NOT_FOUND,
                            f"no {name.removesuffix('_id')} with id {value!r}", param="id")
    for name, value in request.args.items(multi=True):
        if "\x00" in value:
            raise GenqError(ErrorCode.INVALID_REQUEST,
                            f"{name} must not contain NUL (\\u0000) characters", param=name)
