"""`stream: true` on the OpenAI completion routes: the job's deltas (producer.job_stream) as
`chat.completion.chunk` / `text_completion` chunks, a last chunk with the finish reason, the
usage chunk when `stream_options.include_usage`, then `data: [DONE]`. A client that goes away
cancels the job; its partial output stays on the job."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask.typing import ResponseReturnValue

from genq.errors import ErrorCode, GenqError
from genq.models import Job
from genq.settings import Settings
from genq.states import JobStatus
from producer.job_stream import Delta, Finished, Idle, JobStreamEvent
from producer.jobs import cancel_job
from producer.openai_compat import CompletionRequest, completion_object
from producer.submit import submit_job
from results_api.handoff import Stream, hand_off
from results_api.sse import KEEP_ALIVE, sse
from results_api.waits import take_required_wait_slot

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def stream_completion(settings: Settings, tenant_id: str,
                      completion: CompletionRequest) -> ResponseReturnValue:
    release_slot = take_required_wait_slot(tenant_id, "streams and waits")
    try:
        job = submit_job(settings, tenant_id, completion.choice(0)).job
    except BaseException:
        release_slot()
        raise
    render = CompletionChunks(job, completion.include_usage)

    def release() -> None:
        """When the response closes, even before its first chunk: a client that went away
        (or a stream that broke) stops spending on its job. The slot first: cancel_job waits
        for the job's partial output, and a client that saw it could be refused meanwhile."""
        release_slot()
        if not render.finished:
            _cancel_quietly(settings, tenant_id, job.id)

    return hand_off(Stream(settings, tenant_id, job, None, render, release))


class CompletionChunks:
    """The chunks of one completion stream, event by event (results_api.handoff.Stream)."""

    def __init__(self, job: Job, include_usage: bool) -> None:
        self.chat = job.messages is not None
        self.head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{job.id}",
                     "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(job.created_at.timestamp()), "model": job.model}
        self.extra = {"usage": None} if include_usage else {}
        self.include_usage = include_usage
        self.sent = _SentText()
        self.finished = False  # the job's final chunks are out: nothing to cancel
        self.done = False

    def start(self) -> list[str]:
        return [self.chunk("", role=True)] if self.chat else []

    def on(self, event: JobStreamEvent) -> list[str]:
        if isinstance(event, Delta) and event.text:
            new_text = self.sent.add(event)
            if new_text is None:
                self.done = True
                return [_RESTARTED]
            return [self.chunk(new_text)] if new_text else []
        if isinstance(event, Idle):
            return [KEEP_ALIVE]
        if isinstance(event, Finished):
            self.finished = self.done = True
            if event.job.status == JobStatus.SUCCEEDED.value and self.sent.text != (
                    event.job.output_text or ""):
                return [_RESTARTED]
            return list(_last_chunks(event.job, self.chunk, self.head, self.include_usage))
        return []

    def chunk(self, text: str | None, finish_reason: str | None = None,
              role: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return sse({**self.head, "choices": [choice], **self.extra})


class _SentText:
    """The text a client was sent. Chunks cannot be taken back, so a rerun of the job (its
    worker lost) is sent only past that text, and only if it starts with it (greedy or seeded
    sampling does); otherwise the stream ends with an error rather than disagree with the
    job's output."""

    def __init__(self) -> None:
        self.text, self._attempt, self._attempt_text = "", None, ""

    def add(self, delta: Delta) -> str | None:
        """The part of `delta` to send ("" while a rerun catches up); None when it diverged."""
        if delta.id.attempt != self._attempt:
            self._attempt, self._attempt_text = delta.id.attempt, ""
        self._attempt_text += delta.text
        if len(self._attempt_text) <= len(self.text):
            return "" if self.text.startswith(self._attempt_text) else None
        if not self._attempt_text.startswith(self.text):
            return None
        new_text, self.text = self._attempt_text[len(self.text):], self._attempt_text
        return new_text


# The openai client raises APIError for an `error` event.
_RESTARTED = sse({"error": {
    "message": "the job restarted after its worker was lost and its new output differs from "
               "the text already streamed; read the job (GET /v1/jobs/{id}) for its output",
    "type": "server_error", "code": "stream_restarted", "param": None}})


def _last_chunks(job: Job, chunk, head: dict[str, Any], include_usage: bool) -> Iterator[str]:
    if job.status != JobStatus.SUCCEEDED.value:
        code = job.error_code or job.status
        message = f"the completion {job.status}: {job.error_message or code}"
        yield sse({"error": {"message": message, "type": "server_error", "code": code,
                             "param": None}})
        return
    yield chunk(None, finish_reason=job.finish_reason or "stop")
    if include_usage:
        usage = completion_object(job).usage.model_dump()
        yield sse({**head, "choices": [], "usage": usage})
    yield DONE


def _cancel_quietly(settings: Settings, tenant_id: str, job_id: str) -> None:
    try:
        cancel_job(settings, tenant_id, job_id)
    except GenqError as error:
        if error.code is not ErrorCode.CONFLICT:  # a finished job has nothing to cancel
            log.warning("canceling job %s after its stream closed: %s", job_id, error.message)
    except Exception:
        log.exception("canceling job %s after its stream closed failed", job_id)
