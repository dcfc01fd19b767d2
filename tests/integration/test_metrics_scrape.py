"""A /metrics scrape over a long history, on real SQLite and PostgreSQL: every statement it
runs reads jobs and webhook deliveries through an index (never a scan of the history), and the
figures still match the database."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import delete, event, func, insert, select

from genq import db, job_store
from genq.metrics import DatabaseCollector
from genq.models import Job, Tenant, WebhookDelivery, WebhookEvent, new_id, utcnow
from genq.states import JobStatus

pytestmark = pytest.mark.integration

NUM_FINISHED = 50_000
FINISHED = ("succeeded", "failed", "canceled", "expired")
PRIORITIES = ("interactive", "default", "batch")
HISTORY_TABLES = ("jobs", "webhook_deliveries")


def _seed_history(url: str, num_finished: int = NUM_FINISHED) -> str:
    """A tenant with `num_finished` jobs finished yesterday (a tenth with a delivered webhook),
    and a few queued ones; returns the tenant's id."""
    with db.transaction(url) as session:
        tenant = Tenant(name="history")
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id
    yesterday = utcnow() - timedelta(days=1)
    jobs = [dict(id=f"job_old{n:08d}", tenant_id=tenant_id, status=FINISHED[n % 4],
                 model=("m1", "m2")[n % 2], priority=PRIORITIES[n % 3], admitted_tokens=10,
                 created_at=yesterday, finished_at=yesterday) for n in range(num_finished)]
    jobs += [dict(id=new_id("job"), tenant_id=tenant_id, status="queued", model="m1",
                  priority="default", admitted_tokens=7, created_at=utcnow(), finished_at=None)
             for _ in range(3)]
    events = [dict(id=f"msg_old{n:08d}", tenant_id=tenant_id, job_id=f"job_old{n:08d}",
                   type="job.succeeded", payload="{}") for n in range(0, num_finished, 10)]
    deliveries = [dict(id=f"dlv_old{n:08d}", event_id=f"msg_old{n:08d}", tenant_id=tenant_id,
                       job_id=f"job_old{n:08d}", url="https://example.com/hook",
                       status="delivered", finished_at=yesterday)
                  for n in range(0, num_finished, 10)]
    with db.core_transaction(url) as conn:
        for table, rows in ((Job, jobs), (WebhookEvent, events), (WebhookDelivery, deliveries)):
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start:start + 5000])
        if url.startswith("postgresql"):
            conn.exec_driver_sql("ANALYZE")  # as autovacuum would after such a load
    return tenant_id


def _finish_one_job_the_usual_way(url: str, tenant_id: str) -> None:
    """A job and a webhook delivery that reach their ends through UPDATEs, as in service."""
    job_id = new_id("job")
    with db.transaction(url) as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, model="m2", priority="batch"))
        session.flush()
        session.add(WebhookEvent(id="msg_new", tenant_id=tenant_id, job_id=job_id,
                                 type="job.succeeded", payload="{}"))
        session.flush()
        session.add(WebhookDelivery(id="dlv_new", event_id="msg_new", tenant_id=tenant_id,
                                    job_id=job_id, url="https://example.com/hook"))
    with db.transaction(url) as session:
        assert job_store.transition(session, job_id, JobStatus.RUNNING, worker_id="w")
        assert job_store.transition(session, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
        session.execute(WebhookDelivery.__table__.update()
                        .where(WebhookDelivery.id == "dlv_new").values(status="failed"))


def _scrape(url: str) -> tuple[dict[tuple, float], list[tuple[str, object]]]:
    """(metric name, labels...) -> value, and the SQL statements the scrape ran."""
    collector = DatabaseCollector(url, 30, target_backlog_seconds=60,
                                  throughput_window_seconds=300, default_worker_slots=32)
    statements: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _many) -> None:
        statements.append((statement, parameters))

    engine = db.get_engine(url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        families = list(collector.collect())
    finally:
        event.remove(engine, "before_cursor_execute", record)
    values = {(sample.name, *sorted(sample.labels.items())): sample.value
              for family in families for sample in family.samples}
    return values, statements


def _full_scans(url: str, statement: str, parameters: object) -> list[str]:
    """The plan lines of `statement` that read jobs or webhook deliveries without an index
    condition: a sequential scan, or a walk of a whole index."""
    with db.get_engine(url).connect() as conn:
        if url.startswith("sqlite"):
            details = [row[-1] for row in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters)]
            return [d for d in details
                    if any(d.startswith(f"SCAN {table}") for table in HISTORY_TABLES)]
        plan = json.loads(json.dumps(conn.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar()))
    bad, nodes = [], [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") in HISTORY_TABLES and (
                node["Node Type"] == "Seq Scan"
                or ("Index" in node["Node Type"] and "Index Cond" not in node)):
            bad.append(f"{node['Node Type']} on {node['Relation Name']}")
    return bad


def test_scrape_reads_no_history_and_matches_the_database(database_url):
    # given 50,000 finished jobs, a few queued, one finished through UPDATEs
    tenant_id = _seed_history(database_url)
    _finish_one_job_the_usual_way(database_url, tenant_id)

    # when /metrics is scraped
    values, statements = _scrape(database_url)

    # then no statement scans the history of jobs or webhook deliveries
    touching = [(s, p) for s, p in statements if any(t in s for t in HISTORY_TABLES)]
    assert len(touching) >= 4
    scans = {s: _full_scans(database_url, s, p) for s, p in touching}
    assert not any(scans.values()), {s: bad for s, bad in scans.items() if bad}

    # and the figures are the database's
    with db.session_factory(database_url)() as session:
        truth = session.execute(select(Job.status, Job.priority, Job.model, func.count())
                                .group_by(Job.status, Job.priority, Job.model)).all()
        deliveries = dict(session.execute(select(WebhookDelivery.status, func.count())
                                          .group_by(WebhookDelivery.status)).all())
    finished: Counter = Counter()
    for status, priority, model, count in truth:
        assert values["genq_jobs", ("model", model), ("priority", priority),
                      ("status", status)] == count
        if status in FINISHED:
            finished[status, model] += count
    assert sum(finished.values()) == NUM_FINISHED + 1
    for (status, model), count in finished.items():
        assert values["genq_jobs_finished_total", ("model", model), ("status", status)] == count
    assert values["genq_queue_depth", ("model", "m1"), ("priority", "default")] == 3
    for status in ("pending", "delivered", "failed"):
        assert values["genq_webhook_deliveries", ("status", status)] == deliveries.get(status, 0)
    assert deliveries == {"delivered": NUM_FINISHED // 10, "failed": 1}


def test_deleting_old_jobs_does_not_lower_the_finished_counter(database_url):
    # given finished jobs, scraped once
    tenant_id = _seed_history(database_url, 2000)
    before, _ = _scrape(database_url)

    # when retention deletes the older half of them
    with db.transaction(database_url) as session:
        session.execute(delete(WebhookDelivery))
        session.execute(delete(WebhookEvent))
        session.execute(delete(Job).where(Job.tenant_id == tenant_id,
                                          Job.id < f"job_old{1000:08d}"))

    # then the counter of finished jobs (a Prometheus counter) does not go back
    after, _ = _scrape(database_url)
    counters = {key: value for key, value in before.items()
                if key[0] in ("genq_jobs_finished_total", "genq_webhook_deliveries")}
    assert counters and all(after[key] == value for key, value in counters.items())
