"""a /metrics scrape independent of history: finished jobs and webhook deliveries counted by
triggers into job_totals / webhook_delivery_totals, and indexes for the live jobs by status and
for the jobs finished in a recent window

Revision ID: 0010_metrics_totals
Revises: 0009_output_logprobs
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_metrics_totals"
down_revision = "0009_output_logprobs"
branch_labels = None
depends_on = None

# Frozen here (a migration must not change when genq.states does).
JOB_TERMINAL = "('succeeded', 'failed', 'canceled', 'expired')"
DELIVERY_TERMINAL = "('delivered', 'failed')"

# Triggers, not application code: every path that finishes a job (the worker's result, the
# reaper, a cancel, a batch cancel, a line refused at ingest) is counted, whichever process
# runs it. A migration that recreates `jobs` (Alembic batch mode on SQLite) drops them: it
# must create them again (tests/integration/test_metrics_scrape.py fails otherwise).
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER {name} AFTER {event} ON {table}
    WHEN NEW.status IN {terminal}{extra}
    BEGIN
        INSERT INTO {totals} ({columns}, count) VALUES ({values}, 1)
        ON CONFLICT ({columns}) DO UPDATE SET count = count + 1;
    END"""
    for table, totals, columns, terminal in (
        ("jobs", "job_totals", "status, priority, model", JOB_TERMINAL),
        ("webhook_deliveries", "webhook_delivery_totals", "status", DELIVERY_TERMINAL))
    for name, event, extra in (
        (f"{totals}_on_insert", "INSERT", ""),
        (f"{totals}_on_update", "UPDATE OF status",
         f" AND OLD.status NOT IN {terminal}"))
    for values in [", ".join(f"NEW.{column}" for column in columns.split(", "))]
]

# PostgreSQL: statement-level triggers over the transition tables, one upsert per statement
# whatever its row count; sorted keys, so two statements lock the total rows in one order.
POSTGRES_FUNCTIONS = [
    f"""CREATE FUNCTION {totals}_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO {totals} ({columns}, count)
            SELECT {columns}, count(*) FROM new_rows WHERE status IN {terminal}
            GROUP BY {columns} ORDER BY {columns}
            ON CONFLICT ({columns}) DO UPDATE SET count = {totals}.count + EXCLUDED.count;
        ELSE
            INSERT INTO {totals} ({columns}, count)
            SELECT {new_columns}, count(*) FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE n.status IN {terminal} AND o.status NOT IN {terminal}
            GROUP BY {new_columns} ORDER BY {new_columns}
            ON CONFLICT ({columns}) DO UPDATE SET count = {totals}.count + EXCLUDED.count;
        END IF;
        RETURN NULL;
    END $$"""
    for totals, columns, terminal in (
        ("job_totals", "status, priority, model", JOB_TERMINAL),
        ("webhook_delivery_totals", "status", DELIVERY_TERMINAL))
    for new_columns in [", ".join(f"n.{column}" for column in columns.split(", "))]
]
POSTGRES_TRIGGERS = [
    f"""CREATE TRIGGER {totals}_on_{event.lower()} AFTER {event} ON {table}
    REFERENCING {transition} FOR EACH STATEMENT EXECUTE FUNCTION {totals}_count()"""
    for table, totals in (("jobs", "job_totals"),
                          ("webhook_deliveries", "webhook_delivery_totals"))
    for event, transition in (("INSERT", "NEW TABLE AS new_rows"),
                              ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"))
]


def upgrade() -> None:
    op.create_table(
        "job_totals",
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("priority", sa.String(16), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "webhook_delivery_totals",
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )
    # Live jobs by status (queue depth, running, the autoscaling load) from the index alone.
    op.create_index("ix_jobs_status_model_priority", "jobs",
                    ["status", "model", "priority", "admitted_tokens"])
    # Jobs finished in a recent window (throughput, per-version figures).
    op.create_index("ix_jobs_status_finished", "jobs", ["status", "finished_at"])
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRES_FUNCTIONS + POSTGRES_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
    op.execute("INSERT INTO job_totals (status, priority, model, count) "
               "SELECT status, priority, model, count(*) FROM jobs "
               f"WHERE status IN {JOB_TERMINAL} GROUP BY status, priority, model")
    op.execute("INSERT INTO webhook_delivery_totals (status, count) "
               "SELECT status, count(*) FROM webhook_deliveries "
               f"WHERE status IN {DELIVERY_TERMINAL} GROUP BY status")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, totals in (("jobs", "job_totals"),
                          ("webhook_deliveries", "webhook_delivery_totals")):
        for suffix in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS {totals}_on_{suffix}"
                       + (f" ON {table}" if postgres else ""))
        if postgres:
            op.execute(f"DROP FUNCTION IF EXISTS {totals}_count()")
    op.drop_index("ix_jobs_status_finished", table_name="jobs")
    op.drop_index("ix_jobs_status_model_priority", table_name="jobs")
    op.drop_table("webhook_delivery_totals")
    op.drop_table("job_totals")
