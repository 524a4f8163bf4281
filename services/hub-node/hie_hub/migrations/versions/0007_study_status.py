"""where each study of an exchange stands at the hub's imaging gateway (for the sending institution)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_status",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("exchange_id", sa.String(64), primary_key=True),
        sa.Column("requester", sa.String(8), nullable=False),
        sa.Column("owner", sa.String(8), nullable=False),
        sa.Column("received", sa.Integer, nullable=False),
        sa.Column("relayed", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("study_status")
