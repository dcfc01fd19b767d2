"""The OpenAPI 3.1 document, generated from the pydantic models that validate and serialize."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from genq.states import JobStatus
from producer.jobs import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from producer.schemas import ErrorResponse, JobList, JobRequest, JobResponse

REF = "#/components/schemas/{model}"


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    _add_schema(schemas, JobRequest, "validation")
    for model in (JobResponse, JobList, ErrorResponse):
        _add_schema(schemas, model, "serialization")
    return {
        "openapi": "3.1.0",
        "info": {"title": "genq", "version": "1",
                 "description": "Self-hosted job system for LLM text generation."},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": _json_response("An error", "ErrorResponse")},
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
    }


def _add_schema(schemas: dict[str, Any], model: type[BaseModel], mode: str) -> None:
    schema = model.model_json_schema(ref_template=REF, mode=mode)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": "#/components/responses/Error"} for status in statuses}


def _paths() -> dict[str, Any]:
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    common_errors = (401, 404, 503)
    return {
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job",
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
                     "description": "Same key + same body returns the same job."},
                    {"name": "Prefer", "in": "header", "schema": {"type": "string"},
                     "description": "`wait=N`: answer 200 if the job finishes within N s."},
                ],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("JobRequest")}}},
                "responses": {
                    "202": _json_response("Queued", "JobResponse"),
                    "200": _json_response("Finished within `Prefer: wait`, or an idempotent "
                                          "replay", "JobResponse"),
                    **_errors(400, 401, 413, 415, 422, 503),
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query",
                     "schema": {"type": "string", "enum": [s.value for s in JobStatus]}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                "default": DEFAULT_LIST_LIMIT}},
                    {"name": "after", "in": "query", "schema": {"type": "string"},
                     "description": "A job id: list the jobs older than it (`last_id`)."},
                ],
                "responses": {"200": _json_response("A page of jobs", "JobList"),
                              **_errors(401, 422, 503)},
            },
        },
        "/v1/jobs/{id}": {
            "get": {
                "summary": "Get a job",
                "parameters": [job_id],
                "responses": {"200": _json_response("The job", "JobResponse"),
                              **_errors(*common_errors)},
            },
        },
        "/v1/jobs/{id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running job",
                "parameters": [job_id],
                "responses": {"200": _json_response("The canceled job", "JobResponse"),
                              **_errors(*common_errors, 409)},
            },
        },
        "/healthz": {"get": {"summary": "Liveness", "security": [],
                             "responses": {"200": {"description": "The process is up"}}}},
        "/readyz": {"get": {"summary": "Readiness: database and broker reachable",
                            "security": [],
                            "responses": {"200": {"description": "Ready"},
                                          "503": {"description": "A dependency is down"}}}},
    }
