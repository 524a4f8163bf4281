"""consent versions set aside while their predecessor is missing (hie_platform.consent_versions)

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from hie_platform.consent_versions import TABLE, held_column

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(TABLE, held_column())


def downgrade() -> None:
    op.drop_column(TABLE, "held")
