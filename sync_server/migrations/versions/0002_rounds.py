"""Rounds: counters, aggregation claim, outcome columns; selections; update size and norm.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sampling_rate', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('selected_count', sa.Integer(), server_default='0',
                                      nullable=False))
        batch_op.add_column(sa.Column('received_count', sa.Integer(), server_default='0',
                                      nullable=False))
        batch_op.add_column(sa.Column('claim', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('measurements', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('published_version', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('strategy_state_sha256', sa.String(length=64),
                                      nullable=True))
    with op.batch_alter_table('updates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('size', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('norm', sa.Float(), nullable=True))
    op.create_table('selections',
    sa.Column('round_id', sa.String(length=128), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('selected_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], ),
    sa.PrimaryKeyConstraint('round_id', 'device_id')
    )


def downgrade() -> None:
    op.drop_table('selections')
    with op.batch_alter_table('updates', schema=None) as batch_op:
        batch_op.drop_column('norm')
        batch_op.drop_column('size')
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        for name in ('strategy_state_sha256', 'published_version', 'measurements', 'reason',
                     'finished_at', 'lease_until', 'claim', 'received_count',
                     'selected_count', 'sampling_rate'):
            batch_op.drop_column(name)
