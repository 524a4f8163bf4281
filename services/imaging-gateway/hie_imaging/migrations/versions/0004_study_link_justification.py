"""an exchange's justification on its study links (an emergency's images are decided with it)

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
    op.add_column("study_links", sa.Column("justification", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("study_links", "justification")
