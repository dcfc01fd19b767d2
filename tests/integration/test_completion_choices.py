"""`n` choices of a synchronous completion are n jobs: refused together, never left behind."""

from __future__ import annotations

import requests

from tests.conftest import TINY_MODEL
from tests.integration.test_cli_api import api  # noqa: F401 (fixture: API, no worker)
from tests.unit.test_cli import genq


def test_choices_refused_by_a_limit_leave_no_job_queued(api, tmp_path):  # noqa: F811
    # Given: a tenant that may have 2 jobs queued, and no worker to run them.
    limited = genq("tenants", "set-limits", "acme", "--max-queued-jobs", "2", cwd=tmp_path,
                   **api)
    assert limited.returncode == 0, limited.stderr
    headers = {"Authorization": f"Bearer {api['GENQ_API_KEY']}"}
    # When: a completion asks for 3 choices.
    answer = requests.post(f"{api['GENQ_API_URL']}/v1/chat/completions", headers=headers,
                           json={"model": TINY_MODEL, "n": 3, "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    # Then: 429, and the two choices already submitted are canceled, not left to run.
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["type"] == "rate_limit_error"
    queued = requests.get(f"{api['GENQ_API_URL']}/v1/jobs?status=queued", headers=headers,
                          timeout=10).json()
    canceled = requests.get(f"{api['GENQ_API_URL']}/v1/jobs?status=canceled", headers=headers,
                            timeout=10).json()
    assert queued["data"] == [] and len(canceled["data"]) == 2
