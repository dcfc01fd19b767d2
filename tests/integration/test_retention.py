"""Retention on a real database: a dry run counts and deletes nothing; a sweep deletes old
finished jobs with their outbox rows and webhook rows, keeps unfinished jobs, and deletes old
files (content included)."""

from __future__ import annotations

import io
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
