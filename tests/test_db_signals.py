"""A signal that lands just after a COMMIT must come out as itself, not as a failed ROLLBACK
("cannot rollback - no transaction is active") that reads like a damaged database."""

from __future__ import annotations

import sqlite3

import pytest

from dtools.exchange.ledger import Ledger
from dtools.index import db as index_db


class SignalAfterCommit:
    """A connection whose COMMIT succeeds and is then interrupted, as SIGTERM can do."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql, *args):
        cur = self.conn.execute(sql, *args)
        if sql.strip().upper() == "COMMIT":
            raise KeyboardInterrupt
        return cur

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_index_migration_interrupted_after_commit(tmp_path):
    conn = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    with pytest.raises(KeyboardInterrupt):
        index_db.migrate(SignalAfterCommit(conn), 0)
    conn.close()
    index_db.open_index(tmp_path / "index.db").close()  # and the next run finishes the job


def test_ledger_migration_interrupted_after_commit(tmp_path):
    led = Ledger.__new__(Ledger)  # a new ledger file, before its migrations
    led.path = tmp_path / "ledger.db"
    led.db = SignalAfterCommit(sqlite3.connect(led.path, isolation_level=None))
    with pytest.raises(KeyboardInterrupt):
        led._migrate()
    led.db.close()
    Ledger(led.path).close()  # and the next run finishes the job
