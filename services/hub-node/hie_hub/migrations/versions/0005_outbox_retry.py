"""outbox rows retried with backoff, then dead-lettered: attempts, next_attempt_at, last_error, dead_at

Revision ID: 0005
Revises: 0004
"""

from hie_platform.migrations import add_outbox_retry_columns, drop_outbox_retry_columns

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_outbox_retry_columns()


def downgrade() -> None:
    drop_outbox_retry_columns()
