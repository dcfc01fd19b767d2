"""OpenAI request and response shapes for /v1/chat/completions and /v1/completions: a request
body becomes a genq JobRequest, a finished job becomes a chat.completion / text_completion.

Batch lines and the synchronous routes share these, so a batch output line's `body` is exactly
what the synchronous call would have answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from genq.models import Job
from genq.states import Priority
from producer.schemas import INT64_MAX, MAX_PENALTY, MAX_TOP_LOGPROBS, JobRequest, Message

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT_COMPLETIONS, COMPLETIONS)
# `n` choices run as n jobs of the synchronous call; a batch line is one job, so n = 1 there.
MAX_CHOICES = 8
# OpenAI parameters genq does not implement: a request that sets one is refused with a message
# naming it (the error type `unsupported_parameter`, results_api.openai_errors), rather than
# answered as if it had been honoured. False, null and the default `{"type": "text"}` pass.
UNSUPPORTED_PARAMETERS = ("tools", "tool_choice", "functions", "function_call",
                          "response_format", "store", "parallel_tool_calls", "logit_bias",
                          "audio", "modalities", "prediction", "web_search_options", "suffix",
                          "best_of")
WHY_UNSUPPORTED: dict[str, str] = {}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the legacy completions' `logprobs`


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """An OpenAI message. `developer` is OpenAI's newer name for `system`; text parts only."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_message(self) -> Message:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
        return Message(role="system" if self.role == "developer" else self.role, content=content)


def _is_unset(name: str, value: Any) -> bool:
    return value is None or value is False or (
        name == "response_format" and value == {"type": "text"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


class _SamplingBody(BaseModel):
    """The OpenAI sampling fields genq honours; `user` is accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="genq extension; -1 disables top-k.")
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=(
        f"Up to {MAX_CHOICES} choices on the synchronous routes, each its own job; 1 in a "
        "batch line."))
    stream: bool | None = Field(None, description=(
        "Server-sent `chat.completion.chunk` / `text_completion` chunks, then `data: [DONE]`; "
        "with n = 1 only, and not in a batch line."))
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    logprobs: bool | int | None = None  # its shape per route: see _top_logprobs

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in UNSUPPORTED_PARAMETERS:
            if name in data and not _is_unset(name, data[name]):
                why = WHY_UNSUPPORTED.get(name, "genq does not implement it")
                raise PydanticCustomError(
                    "unsupported_parameter", "`{param}` is not supported: {why}",
                    {"param": name, "why": why})
        # What is left of them asks for nothing (false, null, the default format).
        return {name: value for name, value in data.items()
                if name not in UNSUPPORTED_PARAMETERS}

    @field_validator("n")
    @classmethod
    def _one_choice_in_a_batch(cls, n: int | None, info: ValidationInfo) -> int | None:
        if n and n > 1 and (info.context or {}).get("in_batch"):
            raise PydanticCustomError("n_in_batch", "a batch line takes n = 1 (one job a line)")
        return n

    @model_validator(mode="after")
    def _stream_one_choice(self, info: ValidationInfo) -> _SamplingBody:
        if self.stream and (info.context or {}).get("in_batch"):
            raise PydanticCustomError("stream_in_batch", "a batch line cannot stream")
        if self.stream and (self.n or 1) > 1:
            raise PydanticCustomError("stream_n", "streaming takes n = 1")
        return self

    @model_validator(mode="after")
    def _logprobs_asked_consistently(self) -> _SamplingBody:
        if getattr(self, "top_logprobs", None) and self.logprobs is not True:
            raise PydanticCustomError("top_logprobs_without_logprobs",
                                      "top_logprobs needs logprobs: true")
        if self.stream and self._top_logprobs() is not None:
            raise PydanticCustomError("stream_logprobs",
                                      "log-probabilities are not streamed; send stream: false")
        return self

    def _top_logprobs(self) -> int | None:
        """How many alternatives per token to return with its logprob; None: no logprobs.
        Chat asks with `logprobs: true` and `top_logprobs: k` (0 by default), the legacy
        completions with `logprobs: k` (each route declares its own fields' types and bounds;
        a route without `top_logprobs` refuses it as an unknown field)."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return getattr(self, "top_logprobs", None) or 0
        return self.logprobs

    def _job_fields(self) -> dict[str, Any]:
        fields = {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
                  "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "metadata": self.metadata,
                  "logprobs": self._top_logprobs()}
        return {name: value for name, value in fields.items() if value is not None}


class ChatCompletionBody(_SamplingBody):
    """Body of `POST /v1/chat/completions` (and of a batch line for that endpoint)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def to_job_request(self, priority: Priority) -> JobRequest:
        max_tokens = self.max_completion_tokens or self.max_tokens
        return JobRequest(
            messages=[message.to_message() for message in self.messages],
            priority=priority,
            **({"max_tokens": max_tokens} if max_tokens is not None else {}),
            **self._job_fields(),
        )


class CompletionBody(_SamplingBody):
    """Body of `POST /v1/completions`: one prompt string (or a list holding one)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int = 16  # OpenAI's default for legacy completions
    echo: Literal[False] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def to_job_request(self, priority: Priority) -> JobRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return JobRequest(prompt=prompt, max_tokens=self.max_tokens, priority=priority,
                          **self._job_fields())


BODY_MODELS: dict[str, type[ChatCompletionBody] | type[CompletionBody]] = {
    CHAT_COMPLETIONS: ChatCompletionBody,
    COMPLETIONS: CompletionBody,
}


@dataclass(frozen=True)
class CompletionRequest:
    """A synchronous completion: `num_choices` jobs of `choice(i)`, one per OpenAI choice."""

    job: JobRequest
    num_choices: int
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    def choice(self, index: int) -> JobRequest:
        """Choice `index`'s job: with a seed, seed + index (so choices differ, reproducibly)."""
        seed = self.job.seed
        if seed is None or index == 0:
            return self.job
        shifted = seed + index if seed <= INT64_MAX - index else seed - index
        return self.job.model_copy(update={"seed": shifted})


def parse_request(endpoint: str, body: dict[str, Any] | bytes, priority: Priority, *,
                  in_batch: bool = False) -> CompletionRequest:
    """Validate an OpenAI body for `endpoint`; raises pydantic's ValidationError (the API
    turns it into an error naming the field)."""
    model, context = BODY_MODELS[endpoint], {"in_batch": in_batch}
    parsed = (model.model_validate_json(body, context=context) if isinstance(body, bytes)
              else model.model_validate(body, context=context))
    return CompletionRequest(parsed.to_job_request(priority), parsed.n or 1, bool(parsed.stream),
                             bool(parsed.stream_options and parsed.stream_options.include_usage))


def parse_body(endpoint: str, body: dict[str, Any] | bytes, priority: Priority) -> JobRequest:
    """A batch line's body as its one job."""
    return parse_request(endpoint, body, priority, in_batch=True).job


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: TextLogprobs | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage


def completion_object(job: Job, *more_choices: Job) -> ChatCompletion | TextCompletion:
    """The OpenAI object for succeeded jobs, one choice each (the first job names it):
    chat.completion for messages, else text_completion. The prompt counts once in `usage`, as
    OpenAI counts it. genq's finish reasons `stop` and `length` are OpenAI's own."""
    jobs = (job, *more_choices)
    prompt_tokens = job.prompt_tokens or 0
    completion_tokens = sum(choice.completion_tokens or 0 for choice in jobs)
    usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
    created = int(job.created_at.timestamp())
    if job.messages is not None:
        return ChatCompletion(
            id=f"chatcmpl-{job.id}", created=created, model=job.model, usage=usage,
            choices=[ChatChoice(index=index,
                                message=AssistantMessage(content=choice.output_text or ""),
                                finish_reason=choice.finish_reason or "stop",
                                logprobs=_chat_logprobs(choice.output_logprobs))
                     for index, choice in enumerate(jobs)],
        )
    return TextCompletion(
        id=f"cmpl-{job.id}", created=created, model=job.model, usage=usage,
        choices=[TextChoice(index=index, text=choice.output_text or "",
                            finish_reason=choice.finish_reason or "stop",
                            logprobs=_text_logprobs(choice.output_logprobs))
                 for index, choice in enumerate(jobs)],
    )


def _chat_logprobs(stored: list | None) -> ChatLogprobs | None:
    """A job's stored logprobs (genq.models.Job.output_logprobs) in chat's shape."""
    if stored is None:
        return None
    return ChatLogprobs(content=[
        TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()),
                     top_logprobs=[TopLogprob(token=text, logprob=value,
                                              bytes=list(text.encode()))
                                   for text, value in top])
        for token, logprob, top in stored])


def _text_logprobs(stored: list | None) -> TextLogprobs | None:
    """A job's stored logprobs in the legacy completions' shape."""
    if stored is None:
        return None
    offsets, offset = [], 0
    for token, _logprob, _top in stored:
        offsets.append(offset)
        offset += len(token)
    return TextLogprobs(tokens=[token for token, _, _ in stored],
                        token_logprobs=[logprob for _, logprob, _ in stored],
                        top_logprobs=[dict(top) for _, _, top in stored], text_offset=offsets)
