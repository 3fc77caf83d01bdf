"""The SQLite index: schema and migrations, ingest, and the one C-FIND query engine."""
