"""Alembic migrations of the chatmw store; ``chatmw db upgrade`` applies them."""
