"""Per-version evaluation metrics (offline on held-out data, online as seen by devices).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'model_metrics',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.Column('source', sa.String(length=32), server_default='offline', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['version'], ['model_versions.version']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('version', 'source', 'name'),
    )


def downgrade() -> None:
    op.drop_table('model_metrics')
