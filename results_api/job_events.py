"""`GET /v1/jobs/{id}/events`: a job's status changes, token deltas and final job as server-sent
events (producer.job_stream). Delta ids are `attempt-token_offset`; send the last one back as
`Last-Event-ID` to resume. A finished job sends its final event at once."""

from __future__ import annotations

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from genq.job_events import EventId
from genq.job_view import JobResponse
from producer.job_stream import Delta, Finished, Idle, JobStreamEvent, StatusChanged
from producer.jobs import get_job
from results_api.context import authenticate, current_settings, current_tenant_id
from results_api.handoff import Stream, hand_off
from results_api.sse import KEEP_ALIVE, sse
from results_api.waits import take_required_wait_slot

bp = Blueprint("job_events", __name__, url_prefix="/v1")
bp.before_request(authenticate)


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> ResponseReturnValue:
    settings, tenant_id = current_settings(), current_tenant_id()
    job = get_job(settings, tenant_id, job_id)  # 404 for another tenant's job
    after = EventId.parse(request.headers.get("Last-Event-ID"))
    release = take_required_wait_slot(tenant_id, "streams and waits")
    return hand_off(Stream(settings, tenant_id, job, after, JobEvents(), release))


class JobEvents:
    """The SSE events of a job's stream events (results_api.handoff.Stream)."""

    done = False

    def start(self) -> list[str]:
        return []

    def on(self, event: JobStreamEvent) -> list[str]:
        if isinstance(event, StatusChanged):
            return [sse({"status": event.status.value}, "status")]
        if isinstance(event, Delta):
            return [sse({"text": event.text, "token_ids": list(event.token_ids)}, "delta",
                        str(event.id))]
        if isinstance(event, Finished):
            self.done = True
            return [sse(JobResponse.from_job(event.job).model_dump(mode="json"), "job")]
        if isinstance(event, Idle):
            return [KEEP_ALIVE]
        return []
