"""ended portal sessions: a patient's sign-out is refused by every replica until the token expires

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ended_portal_sessions",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ended_portal_sessions_expires_at", "ended_portal_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_ended_portal_sessions_expires_at", table_name="ended_portal_sessions")
    op.drop_table("ended_portal_sessions")
