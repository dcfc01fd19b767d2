"""Synchronous OpenAI `POST /v1/chat/completions` and `POST /v1/completions`: the request runs
as an `interactive` job through the queue like any other, and the call waits for it (or, with
`stream: true`, streams it: results_api.completion_chunks).

Past `completion_timeout_seconds` the job is canceled and the call answers 503
`service_unavailable` (genq is overloaded; the openai client retries 5xx on its own).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from genq.errors import ErrorCode, GenqError
from genq.models import Job
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.jobs import cancel_job, get_job
from producer.openai_compat import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    CompletionRequest,
    completion_object,
    parse_request,
)
from producer.submit import submit_job
from results_api.completion_chunks import stream_completion
from results_api.context import authenticate, current_settings, current_tenant_id
from results_api.handoff import WaitThenAnswer, hand_off
from results_api.openai_errors import openai_error_response, register_openai_errors
from results_api.waits import take_required_wait_slot

bp = Blueprint("completions", __name__, url_prefix="/v1")
register_openai_errors(bp)
bp.before_request(authenticate)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    return _answer(_request_for(CHAT_COMPLETIONS))


@bp.post("/completions")
def completions() -> Response:
    return _answer(_request_for(COMPLETIONS))


def _answer(completion: CompletionRequest) -> ResponseReturnValue:
    if completion.stream:
        return stream_completion(current_settings(), current_tenant_id(), completion)
    return _complete(completion)


def _request_for(endpoint: str) -> CompletionRequest:
    if request.mimetype != "application/json":
        raise GenqError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                        "send the body as JSON with `Content-Type: application/json`")
    try:
        return parse_request(endpoint, request.get_data(cache=False), Priority.INTERACTIVE)
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "json_invalid":
            raise
        raise GenqError(ErrorCode.INVALID_JSON,
                        f"the body is not valid JSON: {exc.errors()[0]['msg']}") from None


def _complete(completion: CompletionRequest) -> ResponseReturnValue:
    """One job per choice, all submitted first (they run side by side), then waited for.

    The call holds one of the tenant's wait slots (429 beyond them) while it waits."""
    settings, tenant_id = current_settings(), current_tenant_id()
    jobs: list[Job] = []
    release = take_required_wait_slot(tenant_id)
    try:
        for index in range(completion.num_choices):
            jobs.append(submit_job(settings, tenant_id, completion.choice(index)).job)
    except BaseException:  # e.g. a rate limit after the first choices: none of them is answered
        release()
        for job in jobs:
            _cancel_quietly(settings, tenant_id, job)
        raise
    return hand_off(WaitThenAnswer(
        [job.id for job in jobs], settings.completion_timeout_seconds, release=release,
        answer=lambda: _completion_answer(settings, tenant_id, completion, jobs),
        on_error=openai_error_response))


def _completion_answer(settings: Settings, tenant_id: str, completion: CompletionRequest,
                       jobs: list[Job]) -> ResponseReturnValue:
    jobs = [get_job(settings, tenant_id, job.id) for job in jobs]
    if not all(JobStatus(job.status).is_terminal for job in jobs):
        for job in jobs:
            _cancel_quietly(settings, tenant_id, job)
        raise GenqError(ErrorCode.SERVICE_UNAVAILABLE,
                        f"the completion did not finish within "
                        f"{settings.completion_timeout_seconds:g} s; retry later")
    for job in jobs:
        if job.status != JobStatus.SUCCEEDED.value:
            raise _job_error(job)
    return jsonify(completion_object(*jobs).model_dump(mode="json"))


def _job_error(job: Job) -> GenqError:
    if job.error_code == ErrorCode.INVALID_REQUEST.value:
        return GenqError(ErrorCode.INVALID_REQUEST, job.error_message or "invalid request")
    return GenqError(ErrorCode.INTERNAL,
                     f"the completion {job.status}: {job.error_message or job.error_code}")


def _cancel_quietly(settings: Settings, tenant_id: str, job: Job) -> None:
    try:
        cancel_job(settings, tenant_id, job.id)
    except GenqError:  # it finished in the meantime: nothing to cancel
        pass
