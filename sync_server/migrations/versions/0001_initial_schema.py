"""Initial schema: devices, nonces, model versions, rounds, updates, privacy ledger.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 23:34:04.427701
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('devices',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('public_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('public_key')
    )
    op.create_table('model_versions',
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('parent_version', sa.Integer(), nullable=True),
    sa.Column('manifest', sa.LargeBinary(), nullable=False),
    sa.Column('signature', sa.LargeBinary(), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('version')
    )
    op.create_table('nonces',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('nonce', sa.String(length=32), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('device_id', 'nonce')
    )
    with op.batch_alter_table('nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_nonces_seen_at'), ['seen_at'], unique=False)

    op.create_table('rounds',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=False),
    sa.Column('model_version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.version'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('privacy_ledger',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.String(length=128), nullable=False),
    sa.Column('noise_multiplier', sa.Float(), nullable=False),
    sa.Column('sampling_rate', sa.Float(), nullable=False),
    sa.Column('steps', sa.Integer(), nullable=False),
    sa.Column('epsilon', sa.Float(), nullable=False),
    sa.Column('delta', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('round_id')
    )
    op.create_table('updates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.String(length=128), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('num_examples', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('round_id', 'device_id')
    )


def downgrade() -> None:
    op.drop_table('updates')
    op.drop_table('privacy_ledger')
    op.drop_table('rounds')
    with op.batch_alter_table('nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_nonces_seen_at'))

    op.drop_table('nonces')
    op.drop_table('model_versions')
    op.drop_table('devices')
