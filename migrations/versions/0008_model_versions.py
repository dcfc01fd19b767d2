"""model versions: jobs.model_version (routed at submit, run by a worker of that version),
workers.model_version (heartbeat), and model_routes (each model's routing rules, history kept)

Revision ID: 0008_model_versions
Revises: 0007_admission
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_model_versions"
down_revision = "0007_admission"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("model_version", sa.String(64), nullable=True))
    with op.batch_alter_table("workers") as batch_op:
        batch_op.add_column(sa.Column("model_version", sa.String(64), nullable=True))
    op.create_table(
        "model_routes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("weights", sa.JSON, nullable=False),
        sa.Column("sticky", sa.String(80), nullable=True),
        sa.Column("when_unserved", sa.String(16), nullable=False, server_default="reroute"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_model_routes_model_id", "model_routes", ["model", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_routes_model_id", table_name="model_routes")
    op.drop_table("model_routes")
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("model_version")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("model_version")
