"""The registry as lorafleet wrote it before migrations (tenants, keys, adapters, versions, replica state).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

QUOTA_FIELDS = ("max_adapters", "requests_per_minute", "tokens_per_minute", "max_concurrent_requests")


def upgrade() -> None:
    op.create_table(
        "lorafleet_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "lorafleet_tenants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("allow_base", sa.Boolean, nullable=False),
        *(sa.Column(f, sa.Integer, nullable=True) for f in QUOTA_FIELDS),
        sa.Column("created_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "lorafleet_api_keys",
        sa.Column("id", sa.String(12), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("lorafleet_tenants.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("salt", sa.String(32), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_table(
        "lorafleet_adapters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("lorafleet_tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("pinned", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float, nullable=True),
        sa.UniqueConstraint("tenant_id", "name", name="uq_lorafleet_adapter_name"),
    )
    op.create_table(
        "lorafleet_adapter_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Integer, nullable=False, index=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("retired_at", sa.Float, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "lorafleet_replica_state",
        sa.Column("replica", sa.String(200), primary_key=True),
        sa.Column("heartbeat", sa.Float, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("lorafleet_replica_state", "lorafleet_adapter_versions", "lorafleet_adapters", "lorafleet_api_keys", "lorafleet_tenants",
                  "lorafleet_meta"):
        op.drop_table(table)
