"""`stream: true` on the OpenAI completion routes: the job's deltas (producer.job_stream) as
`chat.completion.chunk` / `text_completion` chunks, a last chunk with the finish reason, the
usage chunk when `stream_options.include_usage`, then `data: [DONE]`. A client that goes away
cancels the job; its partial output stays on the job."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Response

from genq.errors import ErrorCode, GenqError
from genq.models import Job
from genq.settings import Settings
from genq.states import JobStatus
from producer.job_stream import Delta, Finished, Idle, follow_job
from producer.jobs import cancel_job
from producer.openai_compat import CompletionRequest, completion_object
from producer.submit import submit_job
from results_api.sse import KEEP_ALIVE, sse, stream_response, take_stream_slot

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def stream_completion(settings: Settings, tenant_id: str,
                      completion: CompletionRequest) -> Response:
    release_slot = take_stream_slot(tenant_id)
    try:
        job = submit_job(settings, tenant_id, completion.choice(0)).job
    except BaseException:
        release_slot()
        raise
    finished: list[bool] = []  # set by the stream once the job's final chunks are out

    def release() -> None:
        """When the response closes, even before its first chunk: a client that went away
        (or a stream that broke) stops spending on its job."""
        try:
            if not finished:
                _cancel_quietly(settings, tenant_id, job.id)
        finally:
            release_slot()

    return stream_response(_chunks(settings, tenant_id, job, completion, finished), release)


def _chunks(settings: Settings, tenant_id: str, job: Job, completion: CompletionRequest,
            finished: list[bool]) -> Iterator[str]:
    chat = job.messages is not None
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(job.created_at.timestamp()), "model": job.model}
    extra = {"usage": None} if completion.include_usage else {}

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return sse({**head, "choices": [choice], **extra})

    if chat:
        yield chunk("", role=True)
    sent = _SentText()
    for event in follow_job(settings, tenant_id, job):
        if isinstance(event, Delta) and event.text:
            new_text = sent.add(event)
            if new_text is None:
                yield _RESTARTED
                return
            if new_text:
                yield chunk(new_text)
        elif isinstance(event, Idle):
            yield KEEP_ALIVE
        elif isinstance(event, Finished):
            finished.append(True)
            if event.job.status == JobStatus.SUCCEEDED.value and sent.text != (
                    event.job.output_text or ""):
                yield _RESTARTED
                return
            yield from _last_chunks(event.job, chunk, head, completion.include_usage)


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
