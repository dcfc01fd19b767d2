"""one admission path: jobs.admitted_at (when the tenant's limits admitted the job; batch lines
when they enter the feeder's window) and its index for the per-minute window; an index for
the webhook replays-per-minute cap

Revision ID: 0007_admission
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_admission"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs submitted before: admitted when created; batch lines already on the broker too.
    op.execute("UPDATE jobs SET admitted_at = created_at WHERE batch_id IS NULL")
    op.execute("UPDATE jobs SET admitted_at = created_at WHERE batch_id IS NOT NULL AND "
               "batch_line <= (SELECT enqueued_through_line FROM batches "
               "WHERE batches.id = jobs.batch_id)")
    op.create_index("ix_jobs_tenant_admitted", "jobs", ["tenant_id", "admitted_at"])
    op.create_index("ix_webhook_deliveries_tenant_created", "webhook_deliveries",
                    ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_tenant_created", table_name="webhook_deliveries")
    op.drop_index("ix_jobs_tenant_admitted", table_name="jobs")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("admitted_at")
