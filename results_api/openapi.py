"""The OpenAPI 3.1 document, generated from the pydantic models that validate and serialize."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from genq.states import JobStatus
from producer.jobs import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from producer.schemas import (
    NO_NUL_PATTERN,
    BulkJobRequest,
    BulkJobResponse,
    ErrorResponse,
    JobList,
    JobRequest,
    JobResponse,
)
from producer.webhook_schemas import (
    DeliveryList,
    DeliveryResponse,
    EndpointList,
    EndpointRequest,
    EndpointResponse,
    EndpointUpdate,
    SecretResponse,
)
from results_api.openapi_openai import OPENAI_SCHEMAS, openai_paths

REF = "#/components/schemas/{model}"


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (JobRequest, BulkJobRequest, EndpointRequest, EndpointUpdate):
        _add_schema(schemas, model, "validation")
    for model in (JobResponse, JobList, BulkJobResponse, ErrorResponse, EndpointResponse,
                  EndpointList, SecretResponse, DeliveryResponse, DeliveryList):
        _add_schema(schemas, model, "serialization")
    for model, mode in OPENAI_SCHEMAS:
        _add_schema(schemas, model, mode)
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
        "paths": _paths() | openai_paths(_ref, _json_response, _errors),
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
                    {"name": "after", "in": "query",
                     "schema": {"type": "string", "pattern": NO_NUL_PATTERN},
                     "description": "A job id: list the jobs older than it (`last_id`)."},
                ],
                "responses": {"200": _json_response("A page of jobs", "JobList"),
                              **_errors(401, 422, 503)},
            },
        },
        "/v1/jobs/bulk": {
            "post": {
                "summary": "Submit many jobs at once, all or none",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("BulkJobRequest")}}},
                "responses": {"202": _json_response("Queued, in order", "BulkJobResponse"),
                              **_errors(400, 401, 413, 415, 422, 429, 503)},
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
                "description": (
                    "A running job's answer waits (a few worker cancel polls at most) until "
                    "its worker has stopped it and stored the partial output, so `output` "
                    "(`finish_reason: abort`) and `usage` are what the job keeps; `output` "
                    "is null for a job that generated nothing, or whose worker is gone."),
                "parameters": [job_id],
                "responses": {"200": _json_response("The canceled job", "JobResponse"),
                              **_errors(*common_errors, 409)},
            },
        },
        "/v1/jobs/{id}/events": {
            "get": {
                "summary": "Follow a job as server-sent events",
                "description": (
                    "`status` events, `delta` events (`{\"text\", \"token_ids\"}`, id "
                    "`attempt-token_offset`) as the engine makes tokens, then a `job` event "
                    "with the job. Send `Last-Event-ID` to resume after an event; the deltas "
                    "joined equal the job's `output.text`."),
                "parameters": [job_id, {"name": "Last-Event-ID", "in": "header",
                                        "schema": {"type": "string"}}],
                "responses": {"200": {"description": "An event stream",
                                      "content": {"text/event-stream": {}}},
                              **_errors(*common_errors, 429)},
            },
        },
        **_webhook_paths(),
        "/healthz": {"get": {"summary": "Liveness", "security": [],
                             "responses": {"200": {"description": "The process is up"}}}},
        "/readyz": {"get": {"summary": "Readiness: database and broker reachable",
                            "security": [],
                            "responses": {"200": {"description": "Ready"},
                                          "503": {"description": "A dependency is down"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "security": [],
                             "responses": {"200": {"description": "Metrics"}}}},
        "/v1/models": {"get": {"summary": "Known models and their live workers (OpenAI shape)",
                               "responses": {"200": {"description": "A list of models"},
                                             **_errors(401)}}},
    }


def _webhook_paths() -> dict[str, Any]:
    path_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    limit = {"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 100}}

    def body(schema: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}

    def endpoint_answer(description: str) -> dict[str, Any]:
        return {"200": _json_response(description, "EndpointResponse"),
                **_errors(401, 404, 503)}

    return {
        "/v1/webhook-secret": {"post": {
            "summary": "Create or rotate the secret that signs per-job `webhook_url` calls "
                       "(shown once; the old one keeps signing during the grace period)",
            "responses": {"201": _json_response("The new secret", "SecretResponse"),
                          **_errors(401, 503)}}},
        "/v1/webhook-endpoints": {
            "post": {"summary": "Register an endpoint (its `whsec_` secret is shown once)",
                     "requestBody": body("EndpointRequest"),
                     "responses": {"201": _json_response("The endpoint", "EndpointResponse"),
                                   **_errors(400, 401, 415, 422, 503)}},
            "get": {"summary": "List endpoints",
                    "responses": {"200": _json_response("Endpoints", "EndpointList"),
                                  **_errors(401, 503)}},
        },
        "/v1/webhook-endpoints/{id}": {
            "get": {"summary": "Get an endpoint", "parameters": [path_id],
                    "responses": endpoint_answer("The endpoint")},
            "patch": {"summary": "Enable or disable an endpoint", "parameters": [path_id],
                      "requestBody": body("EndpointUpdate"),
                      "responses": {**endpoint_answer("The endpoint"),
                                    **_errors(400, 415, 422)}},
            "delete": {"summary": "Delete an endpoint", "parameters": [path_id],
                       "responses": {"200": {"description": "Deleted"},
                                     **_errors(401, 404, 503)}},
        },
        "/v1/webhook-endpoints/{id}/rotate-secret": {"post": {
            "summary": "Rotate an endpoint's secret (both are signed with during the grace "
                       "period)", "parameters": [path_id],
            "responses": endpoint_answer("The endpoint with its new secret")}},
        "/v1/webhook-endpoints/{id}/deliveries": {"get": {
            "summary": "An endpoint's deliveries, newest first, with every attempt",
            "parameters": [path_id, limit],
            "responses": {"200": _json_response("Deliveries", "DeliveryList"),
                          **_errors(401, 404, 422, 503)}}},
        "/v1/jobs/{id}/deliveries": {"get": {
            "summary": "A job's webhook deliveries, newest first, with every attempt",
            "parameters": [path_id, limit],
            "responses": {"200": _json_response("Deliveries", "DeliveryList"),
                          **_errors(401, 404, 422, 503)}}},
        "/v1/deliveries/{id}": {"get": {
            "summary": "A delivery with every attempt", "parameters": [path_id],
            "responses": {"200": _json_response("The delivery", "DeliveryResponse"),
                          **_errors(401, 404, 503)}}},
        "/v1/deliveries/{id}/replay": {"post": {
            "summary": "Send the delivery's event to its target again (same `webhook-id`)",
            "parameters": [path_id],
            "responses": {"202": _json_response("The new delivery", "DeliveryResponse"),
                          **_errors(401, 404, 409, 503)}}},
    }
