"""record locator and exchange statistics

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "locator",
        sa.Column("patient_key", sa.String(64), primary_key=True),
        sa.Column("hub", sa.String(40), primary_key=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "exchange_counts",
        sa.Column("month", sa.String(7), primary_key=True),
        sa.Column("kind", sa.String(30), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_index("ix_institutions_name", "institutions", ["name"])


def downgrade() -> None:
    op.drop_index("ix_institutions_name", "institutions")
    op.drop_table("exchange_counts")
    op.drop_table("locator")
