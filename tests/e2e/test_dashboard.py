"""/dashboard in a real headless Chromium (Debian's chromium, driven by playwright): it signs
in with an API key, shows a job that was just submitted, logs no console error, and leaves a
screenshot in test-artifacts/."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import redis_db

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
DASHBOARD_REDIS_DB = 10


@pytest.fixture
def chromium_path() -> str:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    return CHROMIUM


def test_dashboard_shows_a_new_job_with_no_console_errors(
    stack_factory, sqlite_url, redis_url, chromium_path
):
    from playwright.sync_api import sync_playwright

    stack = stack_factory(sqlite_url, redis_db(redis_url, DASHBOARD_REDIS_DB))
    job = requests.post(f"{stack.api_url}/v1/jobs", timeout=40,
                        json={"prompt": "Hello dashboard", "max_tokens": 4},
                        headers={"Authorization": f"Bearer {stack.key}",
                                 "Prefer": "wait=30"}).json()
    problems: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda message: message.type == "error"
                and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(f"{stack.api_url}/dashboard")
        page.fill("#key", stack.key)
        page.click("button[type=submit]")
        page.wait_for_selector("#jobs")
        page.wait_for_function("document.querySelector('#throughput-chart').width > 0")
        jobs_table = page.inner_text("#jobs")
        workers_table = page.inner_text("#workers")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        browser.close()

    assert job["id"] in jobs_table and "succeeded" in jobs_table
    assert "dummy:tiny-llama" in workers_table
    assert problems == []


def test_dashboard_needs_a_key_and_models_tell_when_no_worker_is_live(
    stack_factory, sqlite_url, redis_url
):
    stack = stack_factory(sqlite_url, redis_db(redis_url, DASHBOARD_REDIS_DB), worker=False)

    browser = requests.Session()
    anonymous = browser.get(f"{stack.api_url}/dashboard", timeout=10)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', anonymous.text).group(1)
    wrong = browser.post(f"{stack.api_url}/dashboard/sign-in", timeout=10,
                         data={"key": "gq_nope", "csrf_token": csrf})

    assert anonymous.status_code == 200 and 'name="key"' in anonymous.text
    assert "Your recent jobs" not in anonymous.text
    assert wrong.status_code == 401 and "invalid" in wrong.text
    models = requests.get(f"{stack.api_url}/v1/models", timeout=10,
                          headers={"Authorization": f"Bearer {stack.key}"}).json()["data"]
    assert [(m["live_workers"], m["status"]) for m in models] == [(0, "no_live_worker")]
