"""initial consent schema

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
        "consent_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("resource_id", sa.String(36), nullable=False, index=True),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("excluded_institutions", sa.JSON, nullable=False),
        sa.Column("excluded_departments", sa.JSON, nullable=False),
        sa.Column("recorded_by", sa.String(8), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("signer_relationship", sa.String(32), nullable=False),
        sa.Column("resource", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("patient_key", "version", name="uq_consent_versions_patient_version"),
    )
    op.create_table(
        "exchange_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("exchange_id", sa.String(100), nullable=False, index=True),
        sa.Column("kind", sa.String(32)),
        sa.Column("from_institution", sa.String(8)),
        sa.Column("to_institution", sa.String(8)),
        sa.Column("document_types", sa.JSON, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    for table in ("exchange_history", "consent_versions"):
        op.drop_table(table)
    drop_platform_tables()
