"""Selection coins: one stored Bernoulli(q) draw per (device, round) at check-in.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'selection_coins',
        sa.Column('round_id', sa.String(length=128), nullable=False),
        sa.Column('device_id', sa.String(length=32), nullable=False),
        sa.Column('selected', sa.Boolean(), nullable=False),
        sa.Column('model_version', sa.Integer(), nullable=False),
        sa.Column('flipped_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id']),
        sa.ForeignKeyConstraint(['round_id'], ['rounds.id']),
        sa.PrimaryKeyConstraint('round_id', 'device_id'),
    )


def downgrade() -> None:
    op.drop_table('selection_coins')
