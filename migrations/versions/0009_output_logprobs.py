"""jobs.output_logprobs: each generated token's log-probability and its top alternatives, for
jobs that asked (`logprobs`), as the OpenAI routes return them

Revision ID: 0009_output_logprobs
Revises: 0008_model_versions
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_output_logprobs"
down_revision = "0008_model_versions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("output_logprobs", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("output_logprobs")
