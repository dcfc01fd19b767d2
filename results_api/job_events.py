"""`GET /v1/jobs/{id}/events`: a job's status changes, token deltas and final job as server-sent
events (producer.job_stream). Delta ids are `attempt-token_offset`; send the last one back as
`Last-Event-ID` to resume. A finished job sends its final event at once."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request

from genq.job_events import EventId
from genq.job_view import JobResponse
from genq.settings import Settings
from producer.job_stream import Delta, Finished, Idle, StatusChanged, follow_job
from producer.jobs import get_job
from results_api.context import authenticate, current_settings, current_tenant_id
from results_api.sse import KEEP_ALIVE, sse, stream_response, take_stream_slot

bp = Blueprint("job_events", __name__, url_prefix="/v1")
bp.before_request(authenticate)


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    settings, tenant_id = current_settings(), current_tenant_id()
    job = get_job(settings, tenant_id, job_id)  # 404 for another tenant's job
    after = EventId.parse(request.headers.get("Last-Event-ID"))
    return stream_response(_events(settings, tenant_id, job, after), take_stream_slot(tenant_id))


def _events(settings: Settings, tenant_id: str, job, after: EventId | None) -> Iterator[str]:
    for event in follow_job(settings, tenant_id, job, after):
        if isinstance(event, StatusChanged):
            yield sse({"status": event.status.value}, "status")
        elif isinstance(event, Delta):
            yield sse({"text": event.text, "token_ids": list(event.token_ids)}, "delta",
                      str(event.id))
        elif isinstance(event, Finished):
            yield sse(JobResponse.from_job(event.job).model_dump(mode="json"), "job")
        elif isinstance(event, Idle):
            yield KEEP_ALIVE
