"""The metrics store (SQLAlchemy; SQLite by default)."""
from engine.store.sql import Store, store_url

__all__ = ["Store", "store_url"]
