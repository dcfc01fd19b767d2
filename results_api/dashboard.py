"""`GET /dashboard`: a read-only, server-rendered page for operators and tenants: queues per
priority class and per model, and live workers (all tenants, counts only), the signed-in
tenant's recent jobs and batches, and throughput and latency charts of the last hour (Chart.js,
vendored in static/).

A browser cannot send a Bearer header, so the page also takes the API key from an HttpOnly,
SameSite=Strict cookie set by its sign-in form.
"""

from __future__ import annotations

from flask import Blueprint, Response, redirect, render_template, request, url_for

from genq import db, fleet, model_catalog
from genq.api_keys import tenant_id_for_key
from genq.states import JobStatus, Priority
from results_api.context import current_settings

KEY_COOKIE = "genq_dashboard_key"
COOKIE_MAX_AGE_SECONDS = 8 * 3600

bp = Blueprint("dashboard", __name__)


@bp.get("/dashboard")
def dashboard() -> str | tuple[str, int]:
    tenant_id = _tenant_id(_key_from_request())
    if tenant_id is None:
        # 200, not 401: the sign-in form is a page a browser should show without complaint.
        return render_template("dashboard_sign_in.html", failed=False), 200
    settings = current_settings()
    with db.session_factory(settings.database_url_resolved)() as session:
        counts = fleet.job_counts(session)
        catalog = model_catalog.list_models(session, settings)
        workers = fleet.live_workers(session, settings.worker_live_seconds)
        jobs = fleet.recent_jobs(session, tenant_id)
        batches = fleet.recent_batches(session, tenant_id)
        series = fleet.minute_series(session)
    return render_template(
        "dashboard.html", queues=_queues(counts), models=_models(catalog, counts),
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
    key = request.form.get("key", "").strip()
    if _tenant_id(key) is None:
        return render_template("dashboard_sign_in.html", failed=True), 401
    response = redirect(url_for("dashboard.dashboard"))
    response.set_cookie(KEY_COOKIE, key, max_age=COOKIE_MAX_AGE_SECONDS, httponly=True,
                        samesite="Strict", secure=request.is_secure, path="/dashboard")
    return response


def _key_from_request() -> str:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.cookies.get(KEY_COOKIE, "")


def _tenant_id(key: str) -> str | None:
    if not key:
        return None
    with db.session_factory(current_settings().database_url_resolved)() as session:
        return tenant_id_for_key(session, key)


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
