"""A job as the API shows it (`GET /v1/jobs/<id>`) and as its webhook events carry it (their
`data`): one definition for both, in the core, so genq.webhook_events needs nothing of the
producer."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from genq.models import Job
from genq.states import JobStatus, Priority


def unix_seconds(moment: datetime | None) -> int | None:
    """Times in the API are unix seconds, as in the OpenAI API."""
    return None if moment is None else int(moment.timestamp())


class JobOutput(BaseModel):
    text: str
    finish_reason: str | None
    logprobs: list[Any] | None = Field(
        None, description="With `logprobs` asked: per generated token `[text, logprob, "
        "[[text, logprob], ...]]`, its most likely alternatives first.")


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None


class JobError(BaseModel):
    code: str
    message: str | None


class JobResponse(BaseModel):
    """A job as the API shows it; times are unix seconds, as in the OpenAI API."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    priority: Priority
    model: str
    model_version: str | None = Field(
        None, description="The version the job was routed to and runs on; null for a model "
        "without versions.")
    created_at: int
    started_at: int | None
    finished_at: int | None
    output: JobOutput | None
    usage: Usage | None
    error: JobError | None
    metadata: dict[str, str]

    @classmethod
    def from_job(cls, job: Job) -> JobResponse:
        return cls(
            id=job.id,
            status=JobStatus(job.status),
            priority=Priority(job.priority),
            model=job.model,
            model_version=job.model_version,
            created_at=unix_seconds(job.created_at),
            started_at=unix_seconds(job.started_at),
            finished_at=unix_seconds(job.finished_at),
            output=None if job.output_text is None
            else JobOutput(text=job.output_text, finish_reason=job.finish_reason,
                           logprobs=job.output_logprobs),
            usage=None if job.completion_tokens is None
            else Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens),
            error=None if job.error_code is None
            else JobError(code=job.error_code, message=job.error_message),
            metadata=job.metadata_ or {},
        )
