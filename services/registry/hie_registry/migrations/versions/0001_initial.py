"""initial registry schema

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from hie_platform.migrations import create_platform_tables, drop_platform_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_platform_tables()
    op.create_table(
        "institutions",
        sa.Column("code", sa.String(8), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("name_en", sa.String(200)),
        sa.Column("kind", sa.String(20), nullable=False, index=True),
        sa.Column("region", sa.String(40), index=True),
        sa.Column("state", sa.String(20), nullable=False, index=True),
        sa.Column("hub", sa.String(40), index=True),
        sa.Column("departments", sa.JSON, nullable=False),
        sa.Column("fhir_base", sa.String(300)),
        sa.Column("dicom_ae", sa.String(16)),
        sa.Column("dicom_host", sa.String(255)),
        sa.Column("dicom_port", sa.Integer),
        sa.Column("contacts", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "hubs",
        sa.Column("slug", sa.String(40), primary_key=True),
        sa.Column("institution_code", sa.String(8), sa.ForeignKey("institutions.code"), unique=True, nullable=False),
        sa.Column("fhir_base", sa.String(300)),
        sa.Column("gateway_ae", sa.String(16)),
        sa.Column("gateway_host", sa.String(255)),
        sa.Column("gateway_port", sa.Integer),
    )
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("institution_code", sa.String(8), sa.ForeignKey("institutions.code"), nullable=False, index=True),
        sa.Column("secret_hash", sa.String(200), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    for table in ("signing_keys", "clients", "hubs", "institutions"):
        op.drop_table(table)
    drop_platform_tables()
