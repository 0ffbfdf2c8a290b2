"""add metrics tables (seed 001: metric_snapshots, metric_collection_failures)

Revision ID: 20251102_add_metrics_tables
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "20251102_add_metrics_tables"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "metric_snapshots",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("metric_type", sa.String(50), nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("granularity", sa.String(10), nullable=False),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_metric_snapshots_type_time", "metric_snapshots",
                    ["metric_type", "collected_at"])
    op.create_table(
        "metric_collection_failures",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("metric_type", sa.String(50), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("metric_collection_failures")
    op.drop_index("ix_metric_snapshots_type_time", "metric_snapshots")
    op.drop_table("metric_snapshots")
