"""The metrics store: runs, maps, metrics and trials in SQLite (default) or any SQLAlchemy database."""

from engine.store.sql import Store, store_url

__all__ = ["Store", "store_url"]
