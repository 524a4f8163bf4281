"""FHIR versions: a version counter on documents and Tasks (meta.versionId, ETag), the document's last change

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("documents", sa.Column("version", sa.Integer, nullable=False, server_default="1"))
    op.add_column("documents", sa.Column("updated_at", sa.DateTime(timezone=True)))
    op.add_column("tasks", sa.Column("version", sa.Integer, nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("version")
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("version")
