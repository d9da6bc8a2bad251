"""PocketRec sync server (Flask + SQLAlchemy): arrives with the sync-server issue."""
