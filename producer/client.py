"""A small Python client for the genq HTTP API (used by the CLI and the tests)."""

from __future__ import annotations

import time
from typing import Any

import requests

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "expired"})


class GenqAPIError(Exception):
    """An error answer of the API: HTTP status plus the body's code, message and param."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.code = code
        self.message = message
        self.param = param


class GenqClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    def submit(
        self,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        *,
        idempotency_key: str | None = None,
        wait: int | None = None,
        **params: Any,
    ) -> dict:
        """Submit a job; with `wait`, the server holds the answer up to that many seconds."""
        body = dict(params)
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = messages
        headers = {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if wait is not None:
            headers["Prefer"] = f"wait={wait}"
        timeout = self.timeout + (wait or 0)
        return self._request("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout)

    def submit_many(self, jobs: list[dict[str, Any]]) -> list[dict]:
        """Submit up to 1000 jobs in one call, all or none; each is a `POST /v1/jobs` body
        (`prompt` or `messages`, plus params). Returns the queued jobs, in order."""
        return self._request("POST", "/v1/jobs/bulk", json={"jobs": jobs})["data"]

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict:
        """Poll until the job is finished (any terminal status); TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def list(self, status: str | None = None, limit: int | None = None,
             after: str | None = None) -> dict:
        query = {"status": status, "limit": limit, "after": after}
        return self._request("GET", "/v1/jobs",
                             params={k: v for k, v in query.items() if v is not None})

    def _request(self, method: str, path: str, timeout: float | None = None, **kwargs) -> dict:
        response = self.session.request(method, self.base_url + path,
                                        timeout=timeout or self.timeout, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = (body or {}).get("error") if isinstance(body, dict) else None
            if not isinstance(error, dict):
                raise GenqAPIError(response.status_code, "http_error", response.text[:500])
            raise GenqAPIError(response.status_code, error.get("code", "unknown"),
                               error.get("message", ""), error.get("param"))
        if body is None:
            raise GenqAPIError(response.status_code, "invalid_response", response.text[:500])
        return body
