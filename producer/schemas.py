"""Request and response models of the jobs API. The same models validate requests, serialize
jobs and generate the OpenAPI document, so the three cannot drift apart."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from genq.job_view import JobResponse
from genq.states import Priority
from genq.webhook_events import WebhookEventName

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
# Every numeric sampling field is bounded here, at submit: an out-of-range value (top_k=10**30,
# a seed past int64) used to pass and overflow inside the engine step, which aborts the whole
# batch of neighbours (issue 18). top_k at or above a model's vocabulary means "off" to the
# engine, so one bound above every vocabulary serves every model without loading a tokenizer.
MAX_TOP_K = 1_000_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_PENALTY = 2.0  # presence and frequency penalties: OpenAI's [-2, 2]
MAX_REPETITION_PENALTY = 10.0
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs
MAX_METADATA_KEYS = 16
# Jobs per bulk submit: one transaction and one publish batch for all of them.
MAX_JOBS_PER_BULK = 1000
# JSON Schema for "no NUL character" (stored_text; query values, see results_api.app).
NO_NUL_PATTERN = "^[^\\u0000]*$"


def stored_text(min_length: int | None = None, max_length: int | None = None) -> Any:
    """A string kept in a text column (not inside JSON): these lengths and no NUL character,
    which PostgreSQL text cannot hold (its driver raises: a 500). Refused on every database."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length),
                     AfterValidator(_refuse_nul),
                     Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]


def _refuse_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain NUL (\\u0000) characters")
    return value


StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
WebhookUrl = stored_text(min_length=1, max_length=2048)


def _stop_as_list(value: Any) -> Any:
    # `stop` accepts a string or a list of strings (OpenAI style); one shape downstream.
    return [value] if isinstance(value, str) else value


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class JobRequest(BaseModel):
    """Body of `POST /v1/jobs`: exactly one of `prompt` or `messages`, plus sampling params."""

    model_config = ConfigDict(extra="forbid")

    prompt: stored_text(min_length=1) | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    model: str | None = Field(None, description="Defaults to the server's configured model. "
                              "`MODEL@VERSION` pins one of the model's versions.")
    max_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=MAX_TOP_K, description="-1 disables top-k.")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[
        # The length limit sits on the list itself: on the optional it would be applied to
        # an explicit `null` too, and fail there with a TypeError (a 500).
        Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None,
        BeforeValidator(_stop_as_list),
        Field(description=f"A string or up to {MAX_STOP_SEQUENCES} strings of at most "
                          f"{MAX_STOP_LENGTH} characters."),
    ] = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(1.0, gt=0, le=MAX_REPETITION_PENALTY,
                                      description="vLLM's; 1 is off.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Store each generated token's "
        "log-probability and this many most likely alternatives (the OpenAI routes return "
        "them).")
    priority: Priority = Priority.DEFAULT
    timeout_s: int | None = Field(
        None, ge=1, le=7 * 24 * 3600,
        description="Deadline in seconds from submission: past it the job is `expired` "
        "(a running job keeps its partial output).")
    metadata: Annotated[
        dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)
    ] = Field(default_factory=dict)
    webhook_url: WebhookUrl | None = Field(
        None, description="Called (signed, Standard Webhooks v1) when the job reaches one of "
        "`webhook_events`. Needs the tenant's secret: `POST /v1/webhook-secret`.")
    webhook_events: Annotated[list[WebhookEventName], Field(min_length=1)] | None = Field(
        None, description="Default: the terminal states (succeeded, failed, canceled, expired).")

    @classmethod
    def from_json(cls, body: bytes | str) -> JobRequest:
        """Parse a request body. Strict: `"max_tokens": true` or `"5"` is an error, not 1 or 5."""
        return cls.model_validate_json(body, strict=True)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            param = "prompt" if self.prompt is None else "messages"
            raise PydanticCustomError(
                "prompt_or_messages",
                "exactly one of `prompt` or `messages` is required",
                {"param": param},
            )
        return self

    def sampling_params(self) -> dict[str, Any]:
        """The engine's `SamplingParams` keyword arguments; the worker passes them as they are."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            **self._penalties(),
            **({"logprobs": self.logprobs} if self.logprobs is not None else {}),
        }

    def _penalties(self) -> dict[str, float]:
        """Only the penalties that are set: a job row without them stays as before, and a worker
        not yet knowing them still runs it."""
        defaults = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
        return {name: getattr(self, name) for name, default in defaults.items()
                if getattr(self, name) != default}


class BulkJobRequest(BaseModel):
    """Body of `POST /v1/jobs/bulk`: jobs submitted together, all or none."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(
        description=f"1 to {MAX_JOBS_PER_BULK} jobs (413 above), each as `POST /v1/jobs` "
        "takes it. No `Idempotency-Key`: a retried call submits its jobs again.")

    @classmethod
    def from_json(cls, body: bytes | str) -> BulkJobRequest:
        """Parse a request body, as strictly as `JobRequest.from_json`."""
        return cls.model_validate_json(body, strict=True)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobResponse]
    has_more: bool
    last_id: str | None


class BulkJobResponse(BaseModel):
    """The queued jobs of a bulk submit, in the order of the request."""

    object: Literal["list"] = "list"
    data: list[JobResponse]


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
