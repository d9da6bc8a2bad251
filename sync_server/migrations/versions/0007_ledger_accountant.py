"""Privacy ledger: the mechanism composed and the accountant that computed each row.

Rows written before this revision were computed by opacus' RDP accountant: "rdp".

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('privacy_ledger', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mechanism', sa.String(length=32),
                                      server_default='poisson_sampled_gaussian',
                                      nullable=False))
        batch_op.add_column(sa.Column('accountant', sa.String(length=16),
                                      server_default='rdp', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('privacy_ledger', schema=None) as batch_op:
        batch_op.drop_column('accountant')
        batch_op.drop_column('mechanism')
