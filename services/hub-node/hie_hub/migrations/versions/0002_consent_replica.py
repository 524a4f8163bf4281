"""the hub's replica of the consent feed

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consent_replica",
        sa.Column("patient_key", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("excluded_institutions", sa.JSON, nullable=False),
        sa.Column("excluded_departments", sa.JSON, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("stream_sequence", sa.Integer, nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_consent_replica_stream_sequence", "consent_replica", ["stream_sequence"])


def downgrade() -> None:
    op.drop_index("ix_consent_replica_stream_sequence", "consent_replica")
    op.drop_table("consent_replica")
