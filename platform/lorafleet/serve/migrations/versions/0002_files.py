"""Tenants' training files (``/v1/files``, issue 17 step 1): one row per file, its content on disk.

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
    # No foreign key to the tenant: a tenant's deletion leaves its files' rows (and content) for an
    # operator to see and remove (`lorafleet files`), and tenant ids are never reused.
    op.create_table(
        "lorafleet_files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),  # seconds, sub-second: newest first stays exact
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_details", sa.Text, nullable=True),
    )
    op.create_index("ix_lorafleet_files_tenant_created", "lorafleet_files", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_lorafleet_files_tenant_created", table_name="lorafleet_files")
    op.drop_table("lorafleet_files")
