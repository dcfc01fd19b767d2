"""The /v1/jobs routes: submit (with idempotency and `Prefer: wait`), bulk submit, get, list,
cancel."""

from __future__ import annotations

from typing import TypeVar

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from genq.errors import ErrorCode, GenqError
from genq.models import Job
from genq.states import JobStatus
from producer.jobs import DEFAULT_LIST_LIMIT, cancel_job, get_job, list_jobs
from producer.schemas import BulkJobRequest, BulkJobResponse, JobList, JobRequest, JobResponse
from producer.submit import submit_job, submit_jobs
from results_api.context import authenticate, current_settings, current_tenant_id, limit_arg
from results_api.handoff import WaitThenAnswer, hand_off
from results_api.waits import take_wait_slot

MAX_IDEMPOTENCY_KEY_LENGTH = 255

Body = TypeVar("Body", JobRequest, BulkJobRequest)

bp = Blueprint("jobs", __name__, url_prefix="/v1")


@bp.before_request
def _check_request() -> None:
    # Refuse an oversized body by its Content-Length before reading it or touching the DB.
    limit = current_settings().max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise GenqError(ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
    authenticate()
    has_body = bool(request.content_length) or "chunked" in request.headers.get(
        "Transfer-Encoding", "")
    if request.method == "POST" and has_body:
        _require_json()


@bp.post("/jobs")
def create_job() -> tuple[Response, int, dict[str, str]]:
    settings = current_settings()
    job_request = _parsed_body(JobRequest)
    wait_seconds = _prefer_wait(request.headers.get("Prefer"), settings.max_wait_seconds)
    tenant_id = current_tenant_id()
    result = submit_job(settings, tenant_id, job_request, _idempotency_key())
    job, status = result.job, 202 if result.created else 200
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if wait_seconds is not None:
        # Beyond the tenant's wait slots the preference is ignored: 202 now, poll the Location.
        release = take_wait_slot(tenant_id)
        if release is not None:
            headers["Preference-Applied"] = f"wait={wait_seconds}"
            unfinished = [] if JobStatus(job.status).is_terminal else [job.id]
            return hand_off(WaitThenAnswer(
                unfinished, wait_seconds, release=release,
                answer=lambda: _job_response(get_job(settings, tenant_id, job.id), status,
                                             headers)))
    return _job_response(job, status, headers)


@bp.post("/jobs/bulk")
def create_jobs() -> tuple[Response, int]:
    bulk = _parsed_body(BulkJobRequest)
    results = submit_jobs(current_settings(), current_tenant_id(), bulk.jobs)
    jobs = [JobResponse.from_job(result.job) for result in results]
    return jsonify(BulkJobResponse(data=jobs).model_dump(mode="json")), 202


@bp.get("/jobs/<job_id>")
def read_job(job_id: str) -> tuple[Response, int, dict[str, str]]:
    return _job_response(get_job(current_settings(), current_tenant_id(), job_id))


@bp.get("/jobs")
def read_jobs() -> Response:
    page = list_jobs(current_settings(), current_tenant_id(), status=_status_arg(),
                     limit=limit_arg(DEFAULT_LIST_LIMIT), after=request.args.get("after") or None)
    return jsonify(JobList(
        data=[JobResponse.from_job(job) for job in page.jobs],
        has_more=page.has_more,
        last_id=page.jobs[-1].id if page.jobs else None,
    ).model_dump(mode="json"))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> tuple[Response, int, dict[str, str]]:
    return _job_response(cancel_job(current_settings(), current_tenant_id(), job_id))


def _job_response(
    job: Job, status: int = 200, headers: dict[str, str] | None = None
) -> tuple[Response, int, dict[str, str]]:
    if JobStatus(job.status).is_terminal:
        status = 200  # a 202 says "accepted, not finished"
    return jsonify(JobResponse.from_job(job).model_dump(mode="json")), status, headers or {}


def _require_json() -> None:
    if request.mimetype != "application/json":
        raise GenqError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                        "send the body as JSON with `Content-Type: application/json`")


def _parsed_body(schema: type[Body]) -> Body:
    _require_json()
    try:
        return schema.from_json(request.get_data(cache=False))
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "json_invalid":
            raise
        raise GenqError(ErrorCode.INVALID_JSON,
                        f"the body is not valid JSON: {exc.errors()[0]['msg']}") from None


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
                        param="Idempotency-Key")
    return key


def _prefer_wait(header: str | None, max_wait: int) -> int | None:
    """`Prefer: wait=N` (RFC 7240), N whole seconds in 0..max_wait; None when absent."""
    for preference in (header or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        # isdigit() alone admits "²", which int() refuses.
        if not (value.isascii() and value.isdigit()) or int(value) > max_wait:
            raise GenqError(ErrorCode.INVALID_REQUEST,
                            f"Prefer: wait must be a whole number of seconds from 0 to {max_wait}",
                            param="Prefer")
        return int(value)
    return None


def _status_arg() -> JobStatus | None:
    value = request.args.get("status")
    if not value:
        return None
    try:
        return JobStatus(value)
    except ValueError:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"status must be one of {', '.join(s.value for s in JobStatus)}",
                        param="status") from None


