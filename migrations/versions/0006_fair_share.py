"""fair share inside a priority class: the share level on outbox rows, and an index for the
tenant's backlog count (issue 8)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("share_level", sa.Integer(), nullable=False,
                                      server_default="0"))
    # The wider index has (tenant_id, status) as its prefix, so it replaces the old one.
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_tenant_status_model_priority",
                              ["tenant_id", "status", "model", "priority", "created_at"])
        batch_op.drop_index("ix_jobs_tenant_status")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_tenant_status", ["tenant_id", "status"])
        batch_op.drop_index("ix_jobs_tenant_status_model_priority")
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("share_level")
