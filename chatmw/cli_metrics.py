"""The ``chatmw metrics`` command."""
