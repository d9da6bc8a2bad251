"""Rate-limit counters shared by all workers; an index for pruning silent devices.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 10:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'rate_limits',
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('hits', sa.Integer(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('key'),
    )
    op.create_index('ix_rate_limits_expires_at', 'rate_limits', ['expires_at'])
    op.create_index('ix_devices_last_seen_at', 'devices', ['last_seen_at'])


def downgrade() -> None:
    op.drop_index('ix_devices_last_seen_at', table_name='devices')
    op.drop_index('ix_rate_limits_expires_at', table_name='rate_limits')
    op.drop_table('rate_limits')
