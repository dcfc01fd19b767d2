"""The OpenAPI part for the OpenAI-compatible routes (files, batches, completions); merged into
the document by results_api.openapi, whose `ref`/`json_response`/`errors` helpers it takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from producer.batch_schemas import (
    BatchCreateRequest,
    BatchList,
    BatchObject,
    BatchRetryRequest,
    FileDeleted,
    FileObject,
)
from producer.batches import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from producer.openai_compat import (
    ChatCompletion,
    ChatCompletionBody,
    CompletionBody,
    TextCompletion,
)
from producer.schemas import NO_NUL_PATTERN

OPENAI_SCHEMAS: list[tuple[type[BaseModel], str]] = [
    *((model, "validation") for model in (BatchCreateRequest, BatchRetryRequest,
                                           ChatCompletionBody, CompletionBody)),
    *((model, "serialization") for model in (FileObject, FileDeleted, BatchObject, BatchList,
                                              ChatCompletion, TextCompletion)),
]


def openai_paths(ref: Callable[[str], dict], json_response: Callable[[str, str], dict],
                 errors: Callable[..., dict]) -> dict[str, Any]:
    path_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

    def body(schema: str, required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": ref(schema)}}}

    def batch_answer(description: str, *statuses: int) -> dict[str, Any]:
        return {"200": json_response(description, "BatchObject"), **errors(401, 404, *statuses)}

    def completion(summary: str, request: str, response: str) -> dict[str, Any]:
        return {"post": {
            "summary": summary, "requestBody": body(request),
            "responses": {"200": json_response("The finished completion", response),
                          **errors(400, 401, 413, 415, 422, 500, 503)}}}

    upload = {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string", "enum": ["batch"]}}}}}
    return {
        "/v1/files": {
            "post": {"summary": "Upload a JSONL file (streamed to disk; 413 past the limits)",
                     "requestBody": {"required": True, "content": upload},
                     "responses": {"200": json_response("The file", "FileObject"),
                                   **errors(401, 413, 415, 422)}},
            "get": {"summary": "List files, newest first",
                    "responses": {"200": {"description": "A list of FileObject"},
                                  **errors(401)}},
        },
        "/v1/files/{id}": {
            "get": {"summary": "Get a file", "parameters": [path_id],
                    "responses": {"200": json_response("The file", "FileObject"),
                                  **errors(401, 404)}},
            "delete": {"summary": "Delete a file (409 while a batch uses it)",
                       "parameters": [path_id],
                       "responses": {"200": json_response("Deleted", "FileDeleted"),
                                     **errors(401, 404, 409)}},
        },
        "/v1/files/{id}/content": {"get": {
            "summary": "A file's content; a batch's output or error file holds the lines "
                       "finished so far while the batch runs", "parameters": [path_id],
            "responses": {"200": {"description": "JSONL",
                                  "content": {"application/jsonl": {}}}, **errors(401, 404)}}},
        "/v1/batches": {
            "post": {"summary": "Create a batch from an uploaded file",
                     "requestBody": body("BatchCreateRequest"),
                     "responses": batch_answer("The batch (validating)", 400, 422)},
            "get": {"summary": "List batches, newest first (`after`: a batch id)",
                    "parameters": [
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                    "default": DEFAULT_LIST_LIMIT}},
                        {"name": "after", "in": "query",
                         "schema": {"type": "string", "pattern": NO_NUL_PATTERN}}],
                    "responses": {"200": json_response("A page of batches", "BatchList"),
                                  **errors(401, 422)}},
        },
        "/v1/batches/{id}": {"get": {"summary": "Get a batch with its counts and progress",
                                     "parameters": [path_id],
                                     "responses": batch_answer("The batch")}},
        "/v1/batches/{id}/cancel": {"post": {
            "summary": "Cancel: queued lines stop, finished lines are kept",
            "parameters": [path_id], "responses": batch_answer("The batch", 409)}},
        "/v1/batches/{id}/retry": {"post": {
            "summary": "genq: a new batch of the failed or expired lines of a finished batch",
            "parameters": [path_id], "requestBody": body("BatchRetryRequest", required=False),
            "responses": batch_answer("The new batch", 409, 422)}},
        "/v1/chat/completions": completion("OpenAI chat completion (runs as an interactive job)",
                                           "ChatCompletionBody", "ChatCompletion"),
        "/v1/completions": completion("OpenAI text completion (runs as an interactive job)",
                                      "CompletionBody", "TextCompletion"),
    }
