"""Retention on a real database: a dry run counts and deletes nothing; a sweep deletes old
finished jobs with their outbox rows and webhook rows, keeps unfinished jobs, and deletes old
files (content included)."""

from __future__ import annotations

import io
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from genq import db
from genq.models import File, Job, Outbox, WebhookDelivery, WebhookEvent, utcnow
from genq.retention import files_dir, prune
from genq.states import JobStatus
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR
from tests.integration.test_webhook_api import HOOK, auth_for, make_settings, move, submit

pytestmark = pytest.mark.integration


def _rows(database_url: str, model) -> int:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_prune_deletes_old_finished_work_and_keeps_the_rest(database_url, tmp_path):
    # given a finished job with a webhook delivery, a queued job, and an uploaded file
    settings = make_settings(database_url, Path(MODEL_CACHE_DIR), webhook_allow_private=True,
                             data_dir=tmp_path, retention_job_days=30)
    client, auth = create_app({"GENQ_SETTINGS": settings}).test_client(), auth_for(settings)
    client.post("/v1/webhook-secret", headers=auth)
    finished = submit(client, auth, webhook_url=HOOK)["id"]
    queued = submit(client, auth)["id"]
    move(settings, finished, JobStatus.FAILED)
    upload = client.post("/v1/files", content_type="multipart/form-data", headers=auth,
                         data={"purpose": "batch", "file": (io.BytesIO(b"{}\n"), "f.jsonl")})
    assert upload.status_code == 200, upload.json
    later = utcnow() + timedelta(days=31)

    # when a dry run looks 31 days later: it counts, and deletes nothing
    preview = prune(settings, dry_run=True, now=later)
    assert (preview.jobs, preview.webhook_events, preview.webhook_deliveries,
            preview.files) == (1, 1, 1, 1)
    assert _rows(database_url, Job) == 2 and _rows(database_url, File) == 1

    # when the sweep runs: the finished job and its rows are gone, the queued job stays
    done = prune(settings, now=later)
    assert (done.jobs, done.files) == (1, 1)
    with db.session_factory(database_url)() as session:
        assert session.scalars(select(Job.id)).all() == [queued]
        assert session.scalar(select(func.count()).select_from(Outbox)
                              .where(Outbox.job_id == finished)) == 0
    assert _rows(database_url, WebhookEvent) == 0 and _rows(database_url, WebhookDelivery) == 0
    assert _rows(database_url, File) == 0 and list(files_dir(settings).iterdir()) == []

    # and a sweep now (nothing old enough) deletes nothing
    assert prune(settings).jobs == 0


def test_genq_prune_previews_with_dry_run_then_deletes(sqlite_url, tmp_path):
    from tests.unit.test_cli import assert_one_line_error, genq

    # given one finished job and one queued job
    settings = make_settings(sqlite_url, Path(MODEL_CACHE_DIR), data_dir=tmp_path)
    client, auth = create_app({"GENQ_SETTINGS": settings}).test_client(), auth_for(settings)
    finished = submit(client, auth)["id"]
    submit(client, auth)
    move(settings, finished, JobStatus.FAILED)
    env = {"GENQ_DATABASE_URL": sqlite_url, "GENQ_DATA_DIR": str(tmp_path),
           "GENQ_RETENTION_JOB_DAYS": "0.00001"}  # 0.86 s
    time.sleep(1)

    # when `genq prune --dry-run` runs: it names what would go and deletes nothing
    preview = genq("prune", "--dry-run", cwd=tmp_path, **env)
    assert preview.returncode == 0, preview.stderr
    assert preview.stdout.startswith("would delete: jobs: 1,"), preview.stdout
    assert _rows(sqlite_url, Job) == 2

    # when `genq prune` runs: the finished job is gone, the queued one stays
    done = genq("prune", cwd=tmp_path, **env)
    assert done.returncode == 0 and done.stdout.startswith("deleted: jobs: 1,"), done
    assert _rows(sqlite_url, Job) == 1

    # and without a database it says so in one line, creating none
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_one_line_error(genq("prune", cwd=elsewhere), "no_database")
