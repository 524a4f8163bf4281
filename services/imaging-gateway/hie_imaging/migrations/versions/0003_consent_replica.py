"""the gateway's replica of the consent feed (hie_platform.consent_replica, as the hubs')

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from hie_platform.consent_versions import TABLE, consent_replica_columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(TABLE, *consent_replica_columns())
    op.create_index("ix_consent_replica_stream_sequence", TABLE, ["stream_sequence"])


def downgrade() -> None:
    op.drop_index("ix_consent_replica_stream_sequence", TABLE)
    op.drop_table(TABLE)
