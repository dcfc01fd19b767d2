"""The job-row writes a worker queues on its group committer (genq.group_commit), each one
call into genq.job_store, conditional on the worker still holding the job: a duplicate
delivery, a stale worker or a cancel that raced it can never write a second outcome."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from engine.outputs import RequestOutput
from genq.errors import ErrorCode
from genq.job_store import (
    hand_back_to_queue,
    keep_canceled_output,
    mark_started,
    store_results,
    transition,
)
from genq.models import Job
from genq.states import JobStatus

Write = Callable[[Session], object]


def store_outputs(worker_id: str) -> Callable[[Session, list[tuple[str, dict]]], list[None]]:
    """Store a micro-batch of finished jobs' outputs in one UPDATE; a job canceled while it ran
    keeps its partial output."""
    def store(session: Session, outputs: list[tuple[str, dict]]) -> list[None]:
        finished = {job_id: values for job_id, values in outputs
                    if values["finish_reason"] != "abort"}
        succeeded = store_results(session, finished, worker_id=worker_id)
        for job_id, values in outputs:
            if job_id not in succeeded:
                keep_canceled_output(session, job_id, values)
        return [None] * len(outputs)

    return store


def mark_micro_batches_started(worker_id: str) -> Callable[[Session, list[list[str]]],
                                                             list[None]]:
    """Clear the start trace of the micro-batches handed to the engine meanwhile, in one
    UPDATE (none when all their jobs' outcomes are written already: the worker takes a job
    out of its mark then)."""
    def mark(session: Session, micro_batches: list[list[str]]) -> list[None]:
        job_ids = [job_id for mark in micro_batches for job_id in mark.copy()]
        if job_ids:
            mark_started(session, job_ids, worker_id=worker_id)
        return [None] * len(micro_batches)

    return mark


def finish(job_id: str, status: JobStatus, worker_id: str,
           output: RequestOutput | None = None) -> Write:
    values = result_values(output) if output is not None else {}
    return lambda session: transition(session, job_id, status,
                                      extra_where=(Job.worker_id == worker_id,), **values)


def fail(job_id: str, code: ErrorCode, message: str, worker_id: str) -> Write:
    return lambda session: transition(
        session, job_id, JobStatus.FAILED, extra_where=(Job.worker_id == worker_id,),
        error_code=code.value, error_message=message[:2000])


def requeue(job_id: str, worker_id: str, attempt_spent: bool = True) -> Write:
    """Hand a claimed job back to its queue through the outbox, with its attempt given back: a
    clean stop loses no delivery."""
    return lambda session: hand_back_to_queue(session, job_id, worker_id=worker_id,
                                              attempt_spent=attempt_spent)


def result_values(output: RequestOutput, num_top_logprobs: int | None = None) -> dict:
    completion = output.outputs[0]
    values = {
        # A model can generate a NUL, which PostgreSQL text cannot hold: the result's UPDATE
        # would fail on every delivery. U+FFFD, as for any undecodable byte.
        "output_text": completion.text.replace("\x00", "\ufffd"),
        "finish_reason": completion.finish_reason,
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": len(completion.token_ids),
    }
    if completion.logprobs is not None and num_top_logprobs is not None:
        values["output_logprobs"] = _stored_logprobs(completion, num_top_logprobs)
    return values


def _stored_logprobs(completion, num_top: int) -> list:
    """Per token [text, logprob, top]: the engine's entry names the token first, then its top
    alternatives (the token itself among them when it is one), so the top `num_top` by
    logprob are those alternatives."""
    def text(token_id: int) -> str:
        return (completion.token_texts or {}).get(token_id, "").replace("\x00", "\ufffd")

    stored = []
    for entry in completion.logprobs:
        (token_id, logprob), *_ = entry.items()
        top = sorted(entry.items(), key=lambda item: -item[1])[:num_top]
        stored.append([text(token_id), logprob, [[text(i), value] for i, value in top]])
    return stored
