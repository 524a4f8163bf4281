"""consent channels and the patient's view: exclusion reasons, signatures, signers, one-time codes,
accesses and document types

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("consent_versions", sa.Column("signer_name", sa.String(100)))
    op.add_column("consent_versions", sa.Column("signer_contact", sa.String(100)))
    op.add_column("exchange_history", sa.Column("purpose", sa.String(32)))
    op.create_table(
        "consent_exclusions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "consent_version_id", sa.Integer, sa.ForeignKey("consent_versions.id"), nullable=False, index=True
        ),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("code", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
    )
    op.create_index("ix_consent_exclusions_kind_code", "consent_exclusions", ["kind", "code"])
    op.create_table(
        "consent_signatures",
        sa.Column("consent_version_id", sa.Integer, sa.ForeignKey("consent_versions.id"), primary_key=True),
        sa.Column("content_type", sa.String(32), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
    )
    op.create_table(
        "identity_challenges",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True)),
        sa.Column("verified_at", sa.DateTime(timezone=True)),
        sa.Column("agent_institution", sa.String(8)),
        sa.Column("request", sa.JSON),
        sa.Column("consent_version", sa.Integer),
    )
    op.create_table(
        "access_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("node", sa.String(100), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("institution", sa.String(8)),
        sa.Column("document_ids", sa.JSON, nullable=False),
        sa.Column("purpose", sa.String(32)),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("rule", sa.String(64)),
        sa.Column("consent_version", sa.Integer),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("justification", sa.Text),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "document_index",
        sa.Column("document_id", sa.String(64), primary_key=True),
        sa.Column("document_type", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "document_index",
        "access_history",
        "identity_challenges",
        "consent_signatures",
        "consent_exclusions",
    ):
        op.drop_table(table)
    with op.batch_alter_table("exchange_history") as batch:
        batch.drop_column("purpose")
    with op.batch_alter_table("consent_versions") as batch:
        batch.drop_column("signer_contact")
        batch.drop_column("signer_name")
