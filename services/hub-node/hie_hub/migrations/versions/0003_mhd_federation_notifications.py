"""MHD completeness, federated search and notifications: SubmissionSet Lists, federated grants,
rest-hook Subscriptions and their deliveries; the paging index of documents

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_documents_patient_created", "documents", ["patient_key", "created_at", "document_id"])
    op.create_table(
        "submission_sets",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("patient_key", sa.String(64), nullable=False, index=True),
        sa.Column("author_institution", sa.String(8), nullable=False, index=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("document_ids", sa.JSON, nullable=False),
        sa.Column("recipients", sa.JSON, nullable=False),
        sa.Column("resource", sa.JSON, nullable=False),
    )
    op.create_table(
        "federated_grants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("document_id", sa.String(64), nullable=False, index=True),
        sa.Column("requester", sa.String(8), nullable=False),
        sa.Column("holder_hub", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("justification", sa.String(500)),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("institution", sa.String(8), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(2000), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("content", sa.String(16), nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        sa.Column("resource", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subscription_id", sa.String(64), nullable=False, index=True),
        sa.Column("event_number", sa.Integer, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.String(300)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("subscriptions")
    op.drop_table("federated_grants")
    op.drop_table("submission_sets")
    op.drop_index("ix_documents_patient_created", "documents")
