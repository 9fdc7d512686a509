"""Initial schema: contacts, conversations, messages, statuses, touches, exposures.

Revision ID: 0001
Revises: 
Create Date: 2026-12-04 15:27:46.397875
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('contacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=255), nullable=False),
    sa.Column('first_seen_ms', sa.BigInteger(), nullable=False),
    sa.Column('last_seen_ms', sa.BigInteger(), nullable=False),
    sa.Column('last_user_message_ms', sa.BigInteger(), nullable=True),
    sa.Column('first_touch_id', sa.Integer(), nullable=True),
    sa.Column('last_touch_id', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('channel', 'external_id', name='uq_contacts_identity')
    )
    op.create_table('message_statuses',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('platform_message_id', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('occurred_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_title', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('channel', 'platform_message_id', 'status', name='uq_message_statuses')
    )
    op.create_table('raw_payloads',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('received_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('conversations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=255), nullable=False),
    sa.Column('contact_id', sa.Integer(), nullable=True),
    sa.Column('started_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('last_message_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('ended_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('ended_reason', sa.String(length=64), nullable=True),
    sa.Column('message_count', sa.Integer(), nullable=False),
    sa.Column('user_message_count', sa.Integer(), nullable=False),
    sa.Column('first_response_ms', sa.Float(), nullable=True),
    sa.Column('first_response_role', sa.String(length=16), nullable=True),
    sa.Column('resolved', sa.Boolean(), nullable=True),
    sa.Column('handed_off', sa.Boolean(), nullable=False),
    sa.Column('intent', sa.String(length=128), nullable=True),
    sa.Column('last_step', sa.String(length=128), nullable=True),
    sa.Column('first_touch_id', sa.Integer(), nullable=True),
    sa.Column('last_touch_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('channel', 'external_id', name='uq_conversations_external')
    )
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index('ix_conversations_contact', ['contact_id', 'started_at_ms'], unique=False)
        batch_op.create_index('ix_conversations_started', ['started_at_ms'], unique=False)

    op.create_table('exposures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('contact_id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('occurred_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', name='uq_exposures_key')
    )
    with op.batch_alter_table('exposures', schema=None) as batch_op:
        batch_op.create_index('ix_exposures_occurred', ['occurred_at_ms'], unique=False)

    op.create_table('conversation_attributes',
    sa.Column('conversation_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('conversation_id', 'name')
    )
    with op.batch_alter_table('conversation_attributes', schema=None) as batch_op:
        batch_op.create_index('ix_conversation_attributes_value', ['name', 'value'], unique=False)

    op.create_table('messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('conversation_id', sa.Integer(), nullable=False),
    sa.Column('contact_id', sa.Integer(), nullable=True),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('occurred_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('platform_message_id', sa.String(length=255), nullable=True),
    sa.Column('reply_to', sa.String(length=255), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('response_ms', sa.Float(), nullable=True),
    sa.Column('is_first_response', sa.Boolean(), nullable=False),
    sa.Column('intent', sa.String(length=128), nullable=True),
    sa.Column('sentiment', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('status_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', name='uq_messages_key')
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_conversation', ['conversation_id', 'occurred_at_ms'], unique=False)
        batch_op.create_index('ix_messages_occurred', ['occurred_at_ms'], unique=False)
        batch_op.create_index('ix_messages_platform_id', ['channel', 'platform_message_id'], unique=False)

    op.create_table('touches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('contact_id', sa.Integer(), nullable=False),
    sa.Column('conversation_id', sa.Integer(), nullable=True),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('occurred_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=255), nullable=True),
    sa.Column('medium', sa.String(length=255), nullable=True),
    sa.Column('campaign', sa.String(length=255), nullable=True),
    sa.Column('term', sa.String(length=255), nullable=True),
    sa.Column('content', sa.String(length=255), nullable=True),
    sa.Column('ad_id', sa.String(length=255), nullable=True),
    sa.Column('ref', sa.String(length=255), nullable=True),
    sa.Column('click_id', sa.String(length=512), nullable=True),
    sa.Column('referrer', sa.Text(), nullable=True),
    sa.Column('landing_url', sa.Text(), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', name='uq_touches_key')
    )
    with op.batch_alter_table('touches', schema=None) as batch_op:
        batch_op.create_index('ix_touches_contact', ['contact_id', 'occurred_at_ms'], unique=False)
        batch_op.create_index('ix_touches_conversation', ['conversation_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('touches', schema=None) as batch_op:
        batch_op.drop_index('ix_touches_conversation')
        batch_op.drop_index('ix_touches_contact')

    op.drop_table('touches')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_platform_id')
        batch_op.drop_index('ix_messages_occurred')
        batch_op.drop_index('ix_messages_conversation')

    op.drop_table('messages')
    with op.batch_alter_table('conversation_attributes', schema=None) as batch_op:
        batch_op.drop_index('ix_conversation_attributes_value')

    op.drop_table('conversation_attributes')
    with op.batch_alter_table('exposures', schema=None) as batch_op:
        batch_op.drop_index('ix_exposures_occurred')

    op.drop_table('exposures')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index('ix_conversations_started')
        batch_op.drop_index('ix_conversations_contact')

    op.drop_table('conversations')
    op.drop_table('raw_payloads')
    op.drop_table('message_statuses')
    op.drop_table('contacts')
