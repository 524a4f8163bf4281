"""initial imaging gateway schema

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from hie_platform.migrations import create_platform_tables, drop_platform_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_platform_tables()
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("exchange_id", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("sender_institution", sa.String(8)),
        sa.Column("role", sa.String(12), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(300)),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_instances_study", "instances", ["study_instance_uid"])
    op.create_index("ix_instances_state_received", "instances", ["state", "received_at"])
    op.create_table(
        "study_links",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("exchange_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("from_institution", sa.String(8), nullable=False),
        sa.Column("to_institution", sa.String(8), nullable=False),
        sa.Column("from_hub", sa.String(40), nullable=False),
        sa.Column("to_hub", sa.String(40), nullable=False),
        sa.Column("patient_key", sa.String(128), nullable=False),
        sa.Column("document_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("study_links")
    op.drop_table("instances")
    drop_platform_tables()
