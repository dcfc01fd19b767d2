"""Request and response models of the files and batches API, in OpenAI's shapes (plus genq's
`progress` and `retried_from`), also used to generate the OpenAPI document."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from genq.batch_states import BatchStatus
from genq.job_view import unix_seconds
from genq.models import Batch, File, utcnow
from producer.batch_results import BatchProgress
from producer.openai_compat import ENDPOINTS
from producer.schemas import MAX_METADATA_KEYS, MetadataKey, MetadataValue, stored_text

WINDOW_PATTERN = re.compile(r"^([0-9]+)([smh])$")
WINDOW_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW = timedelta(days=7)
# `<n>s|m|h`, checked by window_of; the pattern also goes into the OpenAPI document.
CompletionWindow = Annotated[str, Field(json_schema_extra={"pattern": WINDOW_PATTERN.pattern})]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    line_count: int = Field(description="genq extension: lines in the file.")

    @classmethod
    def from_file(cls, file: File) -> FileObject:
        return cls(id=file.id, bytes=file.bytes, created_at=unix_seconds(file.created_at),
                   filename=file.filename, purpose=file.purpose, line_count=file.line_count)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreateRequest(BaseModel):
    """Body of `POST /v1/batches`. `completion_window` is "24h" in OpenAI; genq takes any
    `<n>s|m|h` up to 7 days. `metadata.strict = "true"` keeps OpenAI's all-or-nothing
    validation: one bad line fails the batch."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: stored_text(min_length=1)
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: CompletionWindow = "24h"
    metadata: Annotated[
        dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)
    ] | None = None

    @field_validator("completion_window")
    @classmethod
    def _valid_window(cls, value: str) -> str:
        window_of(value)
        return value

    @property
    def is_strict(self) -> bool:
        return (self.metadata or {}).get("strict", "").lower() == "true"


class BatchRetryRequest(BaseModel):
    """Optional body of `POST /v1/batches/{id}/retry`."""

    model_config = ConfigDict(extra="forbid")

    completion_window: CompletionWindow | None = None

    @field_validator("completion_window")
    @classmethod
    def _valid_window(cls, value: str | None) -> str | None:
        if value is not None:
            window_of(value)
        return value


def window_of(completion_window: str) -> timedelta:
    match = WINDOW_PATTERN.fullmatch(completion_window)
    if match is None:
        raise ValueError("completion_window must look like 24h, 30m or 90s")
    # Compared as a number first: timedelta overflows (a 500) on `99999999999999999999h`.
    seconds = int(match[1]) * WINDOW_UNIT_SECONDS[match[2]]
    if not 0 < seconds <= MAX_WINDOW.total_seconds():
        raise ValueError("completion_window must be more than 0 and at most 7 days")
    return timedelta(seconds=seconds)


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Progress(BaseModel):
    """genq extension: generation rate and a naive ETA from the rate lines finish at."""

    completion_tokens: int
    tokens_per_second: float | None
    eta_seconds: float | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str
    error_file_id: str
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    progress: Progress
    retried_from: str | None

    @classmethod
    def from_batch(cls, batch: Batch, progress: BatchProgress) -> BatchObject:
        now = utcnow()
        return cls(
            id=batch.id, endpoint=batch.endpoint,
            errors=None if not batch.errors else BatchErrors(data=batch.errors),
            input_file_id=batch.input_file_id, completion_window=batch.completion_window,
            status=BatchStatus(batch.status), output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            **{name: unix_seconds(getattr(batch, name)) for name in (
                "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
            request_counts=RequestCounts(total=progress.total, completed=progress.completed,
                                         failed=progress.failed),
            metadata=batch.metadata_ or None,
            progress=Progress(completion_tokens=progress.completion_tokens,
                              tokens_per_second=progress.tokens_per_second(batch, now),
                              eta_seconds=progress.eta_seconds(batch, now)),
            retried_from=batch.retried_from_batch_id,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
