"""The files and batches part of the genq Python client (used by `genq batch`)."""

from __future__ import annotations

from pathlib import Path

from producer.client import GenqAPIError, GenqClient

DOWNLOAD_CHUNK_BYTES = 1024 * 1024
UPLOAD_TIMEOUT_SECONDS = 600


class BatchClient(GenqClient):
    def upload_file(self, path: Path) -> dict:
        with path.open("rb") as handle:
            return self._request("POST", "/v1/files", timeout=UPLOAD_TIMEOUT_SECONDS,
                                 files={"file": (path.name, handle)},
                                 data={"purpose": "batch"})

    def create_batch(self, input_file_id: str, endpoint: str = "/v1/chat/completions",
                     completion_window: str = "24h", metadata: dict | None = None) -> dict:
        body = {"input_file_id": input_file_id, "endpoint": endpoint,
                "completion_window": completion_window}
        if metadata:
            body["metadata"] = metadata
        return self._request("POST", "/v1/batches", json=body)

    def get_batch(self, batch_id: str) -> dict:
        return self._request("GET", f"/v1/batches/{batch_id}")

    def cancel_batch(self, batch_id: str) -> dict:
        return self._request("POST", f"/v1/batches/{batch_id}/cancel")

    def download_file(self, file_id: str, destination: Path) -> int:
        """Stream a file's content to `destination`; returns the number of bytes written."""
        with self.session.get(f"{self.base_url}/v1/files/{file_id}/content", stream=True,
                              timeout=self.timeout) as response:
            if response.status_code >= 400:
                raise GenqAPIError(response.status_code, "http_error", response.text[:500])
            written = 0
            with destination.open("wb") as handle:
                for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
                    handle.write(chunk)
                    written += len(chunk)
        return written
