"""jobs.is_starting: set by the claim, cleared once the job's micro-batch is in the engine, so a
worker that dies starting a micro-batch leaves a trace of which jobs it was starting

Revision ID: 0011_job_is_starting
Revises: 0010_metrics_totals
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_job_is_starting"
down_revision = "0010_metrics_totals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (no batch mode): SQLite keeps the table and its triggers (0010).
    op.add_column("jobs", sa.Column("is_starting", sa.Boolean, nullable=False,
                                    server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("jobs", "is_starting")
