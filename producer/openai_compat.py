"""OpenAI request and response shapes for /v1/chat/completions and /v1/completions: a request
body becomes a genq JobRequest, a finished job becomes a chat.completion / text_completion.

Batch lines and the synchronous routes share these, so a batch output line's `body` is exactly
what the synchronous call would have answered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from genq.models import Job
from genq.states import Priority
from producer.schemas import JobRequest, Message

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT_COMPLETIONS, COMPLETIONS)


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


class _SamplingBody(BaseModel):
    """The OpenAI sampling fields genq honours; `n`, `stream` and `user` only in their
    single-choice, non-streaming, informational forms."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="genq extension; -1 disables top-k.")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    stream: Literal[False] | None = Field(
        None, description="Streaming is not supported yet; only `false` is accepted.")
    user: str | None = None
    metadata: dict[str, str] | None = None

    def _job_fields(self) -> dict[str, Any]:
        fields = {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
                  "metadata": self.metadata}
        return {name: value for name, value in fields.items() if value is not None}


class ChatCompletionBody(_SamplingBody):
    """Body of `POST /v1/chat/completions` (and of a batch line for that endpoint)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

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

    def to_job_request(self, priority: Priority) -> JobRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return JobRequest(prompt=prompt, max_tokens=self.max_tokens, priority=priority,
                          **self._job_fields())


BODY_MODELS: dict[str, type[ChatCompletionBody] | type[CompletionBody]] = {
    CHAT_COMPLETIONS: ChatCompletionBody,
    COMPLETIONS: CompletionBody,
}


def parse_body(endpoint: str, body: dict[str, Any] | bytes, priority: Priority) -> JobRequest:
    """Validate an OpenAI body for `endpoint` into a JobRequest; raises pydantic's
    ValidationError (the API turns it into a 422 naming the field)."""
    model = BODY_MODELS[endpoint]
    parsed = model.model_validate_json(body) if isinstance(body, bytes) else model.model_validate(
        body)
    return parsed.to_job_request(priority)


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage


def completion_object(job: Job) -> ChatCompletion | TextCompletion:
    """The OpenAI object for a succeeded job: chat.completion for messages, else
    text_completion. genq's finish reasons `stop` and `length` are OpenAI's own."""
    prompt_tokens, completion_tokens = job.prompt_tokens or 0, job.completion_tokens or 0
    usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
    created = int(job.created_at.timestamp())
    finish_reason = job.finish_reason or "stop"
    text = job.output_text or ""
    if job.messages is not None:
        return ChatCompletion(
            id=f"chatcmpl-{job.id}", created=created, model=job.model, usage=usage,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text),
                                finish_reason=finish_reason)],
        )
    return TextCompletion(
        id=f"cmpl-{job.id}", created=created, model=job.model, usage=usage,
        choices=[TextChoice(index=0, text=text, finish_reason=finish_reason)],
    )
