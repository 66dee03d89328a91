"""Tenants' fine-tuning jobs and their events (``/v1/fine_tuning/jobs``, issue 17 step 2).

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
    # As for files: no foreign key to the tenant (a deleted tenant's jobs stay for `lorafleet jobs`).
    op.create_table(
        "lorafleet_ft_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("validation_file", sa.String(40), nullable=True),
        sa.Column("hyperparameters", sa.Text, nullable=False),  # JSON: the resolved values shown to the client
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("config", sa.Text, nullable=False),  # JSON: the FinetuneConfig the job runs, pinned at creation
        sa.Column("metadata", sa.Text, nullable=True),  # JSON: the client's metadata
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("ray_submission_id", sa.String(128), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("fine_tuned_model", sa.String(255), nullable=True),
        sa.Column("error", sa.Text, nullable=True),  # JSON: {code, message, param}
        sa.Column("trained_tokens", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("cancel_requested_at", sa.Float, nullable=True),
    )
    op.create_index("ix_lorafleet_ft_jobs_tenant_created", "lorafleet_ft_jobs", ["tenant_id", "created_at"])
    op.create_index("ix_lorafleet_ft_jobs_status", "lorafleet_ft_jobs", ["status"])
    op.create_table(
        "lorafleet_ft_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # one sequence for all jobs: newest first is seq desc
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=True),  # JSON: step, loss, learning rate, tokens/s, MLflow run id
        sa.Column("checkpoint", sa.Text, nullable=True),  # where the checkpoint this event announces lies
        sqlite_autoincrement=True,
    )
    op.create_index("ix_lorafleet_ft_events_job_seq", "lorafleet_ft_events", ["job_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_lorafleet_ft_events_job_seq", table_name="lorafleet_ft_events")
    op.drop_table("lorafleet_ft_events")
    op.drop_index("ix_lorafleet_ft_jobs_status", table_name="lorafleet_ft_jobs")
    op.drop_index("ix_lorafleet_ft_jobs_tenant_created", table_name="lorafleet_ft_jobs")
    op.drop_table("lorafleet_ft_jobs")
