"""Platform adapters, importable as ``chatmw.adapters``."""
