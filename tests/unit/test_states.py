"""Job states and transitions: the rules every writer goes through."""

import pytest

from genq import db
from genq.job_store import transition
from genq.models import Job, Tenant
from genq.states import TERMINAL_STATES, JobStatus, can_transition


def test_terminal_states_have_no_way_out():
    for source in TERMINAL_STATES:
        for target in JobStatus:
            assert not can_transition(source, target), (source, target)


def test_a_job_runs_before_it_succeeds():
    assert can_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    assert can_transition(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)


def _make_job(url: str) -> str:
    with db.transaction(url) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, model="m", prompt="p")
        session.add(job)
        session.flush()
        return job.id


def test_stale_worker_cannot_overwrite_a_finished_job(database_url):
    job_id = _make_job(database_url)
    with db.transaction(database_url) as session:
        assert transition(session, job_id, JobStatus.RUNNING, worker_id="w1")
        assert transition(session, job_id, JobStatus.SUCCEEDED, output_text="first")
    with db.transaction(database_url) as session:
        assert not transition(session, job_id, JobStatus.SUCCEEDED, output_text="second")
        assert not transition(session, job_id, JobStatus.FAILED, error_code="x")
    with db.transaction(database_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.output_text) == (JobStatus.SUCCEEDED, "first")
        assert job.finished_at is not None and job.finished_at.tzinfo is not None


def test_transition_refuses_a_source_the_rules_do_not_allow(sqlite_url):
    job_id = _make_job(sqlite_url)
    with db.transaction(sqlite_url) as session, pytest.raises(ValueError):
        transition(session, job_id, JobStatus.SUCCEEDED, only_from={JobStatus.QUEUED})


def test_out_of_date_schema_is_refused_with_a_clear_message(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with pytest.raises(db.SchemaOutOfDate, match="genq db upgrade"):
        db.ensure_schema_current(url)
    db.upgrade(url)
    db.ensure_schema_current(url)
