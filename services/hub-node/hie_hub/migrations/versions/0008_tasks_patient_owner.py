"""an index of the exchanges by patient and owner (the purposes a search decides each document for)

Without it SQLite read every Task the reader owns (ix_tasks_owner) and filtered by patient: a
hospital that is sent thousands of referrals read them all on every ITI-67 search. On PostgreSQL the
build takes a lock that holds writes to ``tasks`` back until it ends (one pass over the table).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_patient_owner", "tasks", ["patient_key", "owner"])


def downgrade() -> None:
    op.drop_index("ix_tasks_patient_owner", table_name="tasks")
