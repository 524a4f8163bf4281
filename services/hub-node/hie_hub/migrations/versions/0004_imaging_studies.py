"""imaging studies delivered to the hub's institutions, findable as ImagingStudy (IHE XDS-I.b)

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
    op.create_table(
        "imaging_studies",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("exchange_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("from_institution", sa.String(8), nullable=False),
        sa.Column("to_institution", sa.String(8), nullable=False),
        sa.Column("document_id", sa.String(64), nullable=False),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_update_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_update_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_instance_uid", "exchange_id", name="uq_imaging_studies_study_exchange"),
    )
    op.create_index(
        "ix_imaging_studies_patient_recorded", "imaging_studies", ["patient_key", "recorded_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_imaging_studies_patient_recorded", "imaging_studies")
    op.drop_table("imaging_studies")
