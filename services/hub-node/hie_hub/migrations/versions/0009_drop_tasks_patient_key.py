"""drop ix_tasks_patient_key: ix_tasks_patient_owner (0008) begins with patient_key and serves its reads

Every Task a hub stores (two per referral: the requester's and the owner's copy) wrote one index
more than its reads use.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tasks_patient_key", table_name="tasks")


def downgrade() -> None:
    op.create_index("ix_tasks_patient_key", "tasks", ["patient_key"])
