"""The `genq` command without an API: help that fits 80 columns, --version, the one-line error
of a command that finds no database or no API, and key management on a real SQLite file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from cli.batch import progress_columns, progress_fields

REPO = Path(__file__).resolve().parents[2]


def genq(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("GENQ_")}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60,
                          env={**clean, "PYTHONPATH": str(REPO), "COLUMNS": "80", **env})


def assert_one_line_error(result: subprocess.CompletedProcess, code: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {code}: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("group", [[], ["keys"], ["batch"], ["tenants"], ["db"]])
def test_help_fits_80_columns_without_cut_descriptions(group, tmp_path):
    result = genq(*group, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    assert not [line for line in lines if line.endswith("...") and "Usage:" not in line]


def test_version(tmp_path):
    result = genq("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("genq, version "), result


def test_keys_create_from_another_directory_creates_no_database(tmp_path):
    # Given: a directory where genq never ran. When: keys create. Then: an error that says
    # where the database was looked for, and no empty .genq/genq.db left behind.
    result = genq("keys", "create", "demo", cwd=tmp_path)
    assert_one_line_error(result, "no_database")
    assert str(tmp_path / ".genq" / "genq.db") in result.stderr
    assert "GENQ_DATA_DIR" in result.stderr
    assert not (tmp_path / ".genq" / "genq.db").exists()


@pytest.mark.parametrize("command", [["keys", "list", "demo"], ["keys", "revoke", "key_x"],
                                     ["tenants", "set-limits", "demo", "--rpm", "1"]])
def test_every_database_command_refuses_a_missing_database(command, tmp_path):
    assert_one_line_error(genq(*command, cwd=tmp_path), "no_database")
    assert not (tmp_path / ".genq").exists()


def test_keys_list_and_revoke(tmp_path, sqlite_url):
    env = {"GENQ_DATABASE_URL": sqlite_url}
    created = genq("keys", "create", "demo", cwd=tmp_path, **env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]

    listed = json.loads(genq("keys", "list", "demo", cwd=tmp_path, **env).stdout)
    assert [(k["prefix"], k["revoked_at"]) for k in listed] == [(key[:10], None)]
    assert key not in json.dumps(listed)

    revoked = genq("keys", "revoke", listed[0]["id"], cwd=tmp_path, **env)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"] is not None
    from genq import db
    from genq.api_keys import tenant_id_for_key

    with db.transaction(sqlite_url) as session:
        assert tenant_id_for_key(session, key) is None


def test_keys_errors_are_one_line(tmp_path, sqlite_url):
    env = {"GENQ_DATABASE_URL": sqlite_url}
    assert_one_line_error(genq("keys", "list", "nobody", cwd=tmp_path, **env), "not_found")
    assert_one_line_error(genq("keys", "revoke", "key_nope", cwd=tmp_path, **env), "not_found")
    assert_one_line_error(genq("tenants", "set-limits", "nobody", "--rpm", "1", cwd=tmp_path,
                               **env), "not_found")


@pytest.mark.parametrize("command", [["get", "job_x"], ["list"], ["cancel", "job_x"],
                                     ["submit", "hi"], ["batch", "status", "batch_x"]])
def test_an_unreachable_api_is_one_line(command, tmp_path):
    result = genq(*command, cwd=tmp_path, GENQ_API_KEY="gq_x", GENQ_API_URL="http://127.0.0.1:9")
    assert_one_line_error(result, "api_unreachable")
    assert "http://127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("url", ["localhost:8000", "http://", "http://127.0.0.1:port",
                                 "ftp://127.0.0.1"])
def test_a_malformed_api_url_is_one_line(url, tmp_path):
    # A URL without its scheme (a newcomer's `GENQ_API_URL=localhost:8000`) printed a traceback.
    result = genq("list", cwd=tmp_path, GENQ_API_KEY="gq_x", GENQ_API_URL=url)
    assert_one_line_error(result, "bad_api_url")
    assert repr(url) in result.stderr and "http://127.0.0.1:8000" in result.stderr


def test_a_command_without_a_key_says_how_to_get_one(tmp_path):
    result = genq("get", "job_x", cwd=tmp_path)
    assert result.returncode == 2 and "genq keys create" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_progress_fits_80_columns_for_a_large_batch():
    batch = {"status": "in_progress",
             "request_counts": {"total": 50_000, "completed": 49_000, "failed": 999},
             "progress": {"tokens_per_second": 12345.6, "eta_seconds": 3725}}
    output = io.StringIO()
    console = Console(file=output, width=80, force_terminal=False, color_system=None)
    with Progress(*progress_columns(), console=console, auto_refresh=False) as progress:
        progress.add_task("b", total=50_000, completed=49_999, **progress_fields(batch))
    last = [line for line in output.getvalue().splitlines() if line.strip()][-1]
    for text in ("in_progress", "done 49000 failed 999 of 50000", "12346 tok/s", "ETA 1h02m"):
        assert text in last, last


def test_worker_options_reach_its_celery_app_as_settings_not_the_environment(
        monkeypatch, sqlite_url, redis_url):
    # Regression (issue 21): `genq worker --model` wrote GENQ_MODEL & co. into os.environ and
    # cleared the settings cache, for an app built at import to read them back.
    from celery import Celery
    from click.testing import CliRunner

    from cli.services import worker
    from genq.settings import get_settings

    started = {}
    monkeypatch.setattr(Celery, "worker_main",
                        lambda app, argv: started.update(app=app, argv=argv))
    monkeypatch.setenv("GENQ_BROKER_URL", redis_url)
    monkeypatch.setenv("GENQ_DATABASE_URL", sqlite_url)
    monkeypatch.delenv("GENQ_MODEL", raising=False)
    environment = dict(os.environ)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(worker, ["--model", "other-model", "--model-version", "v2",
                                             "--concurrency", "7"])
    finally:
        get_settings.cache_clear()

    assert result.exit_code == 0, result.output
    settings = started["app"].genq_settings
    assert (settings.model, settings.model_version, settings.worker_concurrency) == (
        "other-model", "v2", 7)
    assert "genq.other-model@v2.interactive" in ",".join(started["argv"])
    assert dict(os.environ) == environment
    assert get_settings().model != "other-model"
