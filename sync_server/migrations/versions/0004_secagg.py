"""SecAgg+: members and relayed shares, the round's graph and stage deadline, the ledger mode.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('secagg', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('stage_deadline', sa.DateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table('privacy_ledger', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mode', sa.String(length=16), server_default='central',
                                      nullable=False))
    op.create_table(
        'secagg_members',
        sa.Column('round_id', sa.String(length=128), nullable=False),
        sa.Column('device_id', sa.String(length=32), nullable=False),
        sa.Column('advert', sa.JSON(), nullable=False),
        sa.Column('advertised_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('shared_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('masked_sha256', sa.String(length=64), nullable=True),
        sa.Column('masked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('reveal', sa.JSON(), nullable=True),
        sa.Column('unmasked_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id']),
        sa.ForeignKeyConstraint(['round_id'], ['rounds.id']),
        sa.PrimaryKeyConstraint('round_id', 'device_id'),
    )
    op.create_table(
        'secagg_shares',
        sa.Column('round_id', sa.String(length=128), nullable=False),
        sa.Column('recipient', sa.String(length=32), nullable=False),
        sa.Column('sender', sa.String(length=32), nullable=False),
        sa.Column('ciphertext', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['round_id'], ['rounds.id']),
        sa.PrimaryKeyConstraint('round_id', 'recipient', 'sender'),
    )


def downgrade() -> None:
    op.drop_table('secagg_shares')
    op.drop_table('secagg_members')
    with op.batch_alter_table('privacy_ledger', schema=None) as batch_op:
        batch_op.drop_column('mode')
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_column('stage_deadline')
        batch_op.drop_column('secagg')
