"""initial hub schema: documents and tasks

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
        "documents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("document_id", sa.String(64), nullable=False, unique=True),
        sa.Column("author_institution", sa.String(8), nullable=False, index=True),
        sa.Column("author_department", sa.String(8)),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("document_type", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("docref", sa.JSON, nullable=False),
        sa.Column("bundle", sa.JSON, nullable=False),
        sa.Column("recipients", sa.JSON, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("exchange_id", sa.String(64)),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("exchange_id", sa.String(64), nullable=False, index=True),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("requester", sa.String(8), nullable=False, index=True),
        sa.Column("requester_hub", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(8), nullable=False, index=True),
        sa.Column("owner_hub", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("focus", sa.JSON, nullable=False),
        sa.Column("task", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tasks")
    op.drop_table("documents")
    drop_platform_tables()
