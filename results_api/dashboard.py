"""`GET /dashboard`: a read-only, server-rendered page for operators and tenants: queues per
priority class and per model, model versions side by side, and live workers (all tenants,
counts only), the signed-in
tenant's recent jobs and batches, and throughput and latency charts of the last hour (Chart.js,
vendored in static/).

A browser cannot send a Bearer header, so the sign-in form starts a session: a signed,
HttpOnly, SameSite=Strict cookie holding the key's id (never the key), checked against the
database on each page so a revoked key ends it. The form carries a CSRF token tied to the
session, and every dashboard page forbids framing (X-Frame-Options, CSP frame-ancestors).
"""

from __future__ import annotations

import hmac
import os
import secrets
from datetime import timedelta
from pathlib import Path

from flask import Blueprint, Flask, Response, redirect, render_template, request, session, url_for

from genq import db, fleet, model_catalog
from genq.api_keys import active_key, is_key_active
from genq.errors import ErrorCode, GenqError
from genq.settings import Settings
from genq.states import JobStatus, Priority
from results_api.context import current_settings

SESSION_COOKIE = "genq_dashboard"
SESSION_MAX_AGE = timedelta(hours=8)
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; "
                           "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

bp = Blueprint("dashboard", __name__)


def init_app(app: Flask, settings: Settings) -> None:
    app.secret_key = settings.secret_key or _local_secret(settings.data_dir)
    app.config.update(SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/dashboard",
                      PERMANENT_SESSION_LIFETIME=SESSION_MAX_AGE)
    app.register_blueprint(bp)


def _local_secret(data_dir: Path) -> str:
    """A random secret kept in the data dir (mode 0600), made on first use."""
    path = data_dir / "secret_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another API process made it first
            return path.read_text().strip()
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


@bp.after_request
def _forbid_framing(response: Response) -> Response:
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@bp.get("/dashboard")
def dashboard() -> str | tuple[str, int]:
    tenant_id = _tenant_id()
    if tenant_id is None:
        # 200, not 401: the sign-in form is a page a browser should show without complaint.
        return _sign_in_form(failed=False), 200
    settings = current_settings()
    with db.session_factory(settings.database_url_resolved)() as session:
        counts = fleet.job_counts(session)
        catalog = model_catalog.list_models(session, settings)
        workers = fleet.live_workers(session, settings.worker_live_seconds)
        jobs = fleet.recent_jobs(session, tenant_id)
        batches = fleet.recent_batches(session, tenant_id)
        series = fleet.minute_series(session)
        stats = fleet.version_stats(session)
    return render_template(
        "dashboard.html", queues=_queues(counts), models=_models(catalog, counts),
        versions=_versions(catalog, stats), version_window=fleet.VERSION_WINDOW_SECONDS // 60,
        workers=workers, jobs=jobs, batches=batches,
        chart_data={
            "labels": [point.minute.strftime("%H:%M") for point in series],
            "jobs_finished": [point.jobs_finished for point in series],
            "tokens_per_second": [round(p.generated_tokens_per_second, 2) for p in series],
            "latency_p50": [point.latency_p50_seconds for point in series],
            "latency_p95": [point.latency_p95_seconds for point in series],
        },
    )


@bp.post("/dashboard/sign-in")
def sign_in() -> Response | tuple[str, int]:
    expected = session.get("csrf", "")
    if not expected or not hmac.compare_digest(expected, request.form.get("csrf_token", "")):
        raise GenqError(ErrorCode.INVALID_REQUEST, "the sign-in form expired or did not come "
                        "from this dashboard; reload it and sign in again", param="csrf_token")
    with db.session_factory(current_settings().database_url_resolved)() as db_session:
        key = active_key(db_session, request.form.get("key", "").strip())
    if key is None:
        return _sign_in_form(failed=True), 401
    session.clear()  # a new session on sign-in: no fixation
    session.permanent = True
    session.update(key_id=key.id, tenant_id=key.tenant_id)
    return redirect(url_for("dashboard.dashboard"))


def _sign_in_form(failed: bool) -> str:
    session.setdefault("csrf", secrets.token_urlsafe(24))
    return render_template("dashboard_sign_in.html", failed=failed, csrf_token=session["csrf"])


def _tenant_id() -> str | None:
    """The tenant of a Bearer key, or of the session's key while that key is not revoked."""
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    with db.session_factory(current_settings().database_url_resolved)() as db_session:
        if scheme.lower() == "bearer" and bearer.strip():
            key = active_key(db_session, bearer.strip())
            return None if key is None else key.tenant_id
        key_id = session.get("key_id")
        if key_id is None or not is_key_active(db_session, key_id):
            return None
    return session.get("tenant_id")


def _queues(counts: list[fleet.JobCount]) -> list[dict]:
    """Queued and running jobs per priority class, highest class first."""
    rows = {p.value: {"priority": p.value, "queued": 0, "running": 0} for p in Priority}
    for count in counts:
        if count.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
            rows[count.priority][count.status] += count.count
    return list(rows.values())


def _models(catalog: list[model_catalog.CatalogModel], counts: list[fleet.JobCount]
            ) -> list[dict]:
    """Known models, plus any other model that still has queued or running jobs (say one
    dropped from GENQ_MODELS): its jobs wait for a worker that may never come."""
    rows = {m.id: {"model": m.id, "live_workers": m.live_workers, "queued": 0, "running": 0}
            for m in catalog}
    for count in counts:
        if count.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
            row = rows.setdefault(count.model, {"model": count.model, "live_workers": 0,
                                                "queued": 0, "running": 0})
            row[count.status] += count.count
    return list(rows.values())


def _versions(catalog: list[model_catalog.CatalogModel], stats: list[fleet.VersionStats]
              ) -> list[dict]:
    """Every version of a routed model (or one that finished jobs lately), with its weight,
    live workers and recent figures, side by side."""
    by_version = {(s.model, s.version): s for s in stats}
    rows = {(m.id, v.version): {"model": m.id, "version": v.version, "weight": v.weight,
                                "live_workers": v.live_workers, "queued": v.queued,
                                "stats": None}
            for m in catalog for v in m.versions}
    for key, value in by_version.items():
        rows.setdefault(key, {"model": key[0], "version": key[1], "weight": 0,
                              "live_workers": 0, "queued": 0, "stats": None})["stats"] = value
    return [rows[key] for key in sorted(rows)]
