"""The store: SQLAlchemy models, engines, migrations and the batch writer."""
