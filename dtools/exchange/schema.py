"""The ledger's tables and their versioned migrations (HOME/outbox/ledger.db).

Version 1 was the relay ledger (deposits, receipts, received envelopes). Version 2 makes it
the whole exchange state: what was sealed for whom, what was opened and whether its receipt
is owed, which peer each archived instance came from, and what was set aside. The state of
each envelope is also kept on its ``sealed`` and ``received`` row, and partial indexes hold
the few that still wait, so that dstatus reads a hundred thousand envelopes in milliseconds. Version 3 adds the
requests this site sent and served through the relay, and the state of its catalog as
published to each peer: a hash and a version per row (one counter for the whole catalog,
tombstones for removals), how far each peer has been sent, and the envelopes that carried it.
Version 4 adds the bridge's deferred forwards: a C-MOVE through a peer's AE title whose study
had not arrived in time, still to be stored to its destination when it does.
"""

SCHEMA = [
    # 1: the relay ledger
    """
    CREATE TABLE sent (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL, part_size INTEGER NOT NULL, parts INTEGER NOT NULL, relay TEXT NOT NULL,
        first_sent REAL NOT NULL, last_sent REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 1,
        complete INTEGER NOT NULL DEFAULT 0, receipt_at REAL, receipt_instances INTEGER,
        PRIMARY KEY (envelope_id, peer));
    CREATE TABLE sent_parts (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, part INTEGER NOT NULL, appended_at REAL NOT NULL,
        PRIMARY KEY (envelope_id, peer, part));
    CREATE TABLE received (
        envelope_id TEXT PRIMARY KEY, sender TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL, received_at REAL NOT NULL, emitted INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE spool_sets (
        envelope_id TEXT PRIMARY KEY, sender TEXT NOT NULL, parts INTEGER NOT NULL, sha256 TEXT NOT NULL,
        first_seen REAL NOT NULL, reported INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE folders (
        relay TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity INTEGER NOT NULL,
        PRIMARY KEY (relay, folder));
    CREATE TABLE receipts_sent (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, instances INTEGER NOT NULL, sent_at REAL NOT NULL,
        PRIMARY KEY (envelope_id, peer));
    """,
    # 2: the exchange state
    """
    CREATE TABLE sealed (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL, instances INTEGER, sealed_at REAL NOT NULL,
        lost_at REAL, removed_at REAL, deposited_at REAL, receipt_at REAL,
        PRIMARY KEY (envelope_id, peer));
    INSERT INTO sealed (envelope_id, peer, path, bytes, sha256, sealed_at, deposited_at, receipt_at)
        SELECT envelope_id, peer, path, bytes, sha256, first_sent, CASE WHEN complete THEN last_sent END,
               receipt_at FROM sent;
    CREATE INDEX sealed_peer ON sealed (peer, lost_at);
    CREATE INDEX sealed_waiting ON sealed (peer, deposited_at, sealed_at) WHERE receipt_at IS NULL AND lost_at IS NULL;
    CREATE INDEX sealed_receipt ON sealed (peer, receipt_at);
    CREATE TABLE sealed_instances (
        peer TEXT NOT NULL, sop TEXT NOT NULL, study TEXT NOT NULL, series TEXT NOT NULL,
        path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
        envelope_id TEXT NOT NULL, sealed_at REAL NOT NULL,
        PRIMARY KEY (peer, sop));
    CREATE INDEX sealed_instances_envelope ON sealed_instances (envelope_id);
    ALTER TABLE received ADD COLUMN handed_at REAL;
    ALTER TABLE received ADD COLUMN quarantined_at REAL;
    ALTER TABLE received ADD COLUMN reason TEXT;
    ALTER TABLE received ADD COLUMN removed_at REAL;
    ALTER TABLE received ADD COLUMN opened_at REAL;
    CREATE INDEX received_sender ON received (sender, received_at);
    CREATE INDEX received_pending ON received (sender, quarantined_at, removed_at) WHERE opened_at IS NULL;
    CREATE INDEX spool_sets_sender ON spool_sets (sender);
    CREATE TABLE opened (
        envelope_id TEXT PRIMARY KEY, sender TEXT NOT NULL, sha256 TEXT NOT NULL, instances INTEGER NOT NULL,
        opened_at REAL NOT NULL, receipt_owed INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX opened_owed ON opened (sender, receipt_owed);
    CREATE TABLE archived (
        sop TEXT PRIMARY KEY, peer TEXT NOT NULL, sha256 TEXT NOT NULL, envelope_id TEXT NOT NULL,
        at REAL NOT NULL);
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY, at REAL NOT NULL, sender TEXT, what TEXT NOT NULL, reason TEXT NOT NULL,
        place TEXT NOT NULL);
    CREATE INDEX quarantine_sender ON quarantine (sender);
    """,
    # 3: searching and retrieving through the relay
    """
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY, peer TEXT NOT NULL, kind TEXT NOT NULL, envelope_id TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL NOT NULL, subject TEXT,
        answered_at REAL, status TEXT NOT NULL DEFAULT 'pending', answer TEXT);
    CREATE INDEX requests_peer ON requests (peer, status);
    CREATE TABLE served (
        request_id TEXT PRIMARY KEY, peer TEXT NOT NULL, kind TEXT NOT NULL, received_at REAL NOT NULL,
        answered_at REAL, status TEXT NOT NULL DEFAULT 'received', reason TEXT);
    CREATE INDEX served_peer ON served (peer, status);
    CREATE TABLE catalog_rows (
        level TEXT NOT NULL, uid TEXT NOT NULL, hash TEXT NOT NULL, version INTEGER NOT NULL,
        removed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (level, uid));
    CREATE INDEX catalog_rows_version ON catalog_rows (version);
    CREATE TABLE catalog_peers (
        peer TEXT PRIMARY KEY, published_version INTEGER NOT NULL DEFAULT 0, published_at REAL);
    CREATE TABLE catalog_state (
        id INTEGER PRIMARY KEY CHECK (id = 1), catalog_id TEXT NOT NULL, created_at REAL NOT NULL,
        index_id TEXT, version INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE catalog_envelopes (
        envelope_id TEXT NOT NULL, peer TEXT NOT NULL, since INTEGER NOT NULL, through INTEGER NOT NULL,
        sealed_at REAL NOT NULL, lost_seen INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (envelope_id, peer));
    ALTER TABLE received ADD COLUMN channel TEXT NOT NULL DEFAULT 'envelope';
    ALTER TABLE sent ADD COLUMN kind TEXT NOT NULL DEFAULT 'envelope';
    ALTER TABLE sealed ADD COLUMN request_id TEXT;
    ALTER TABLE received ADD COLUMN request_id TEXT;
    """,
    # 4: the bridge's deferred forwards
    """
    CREATE TABLE forwards (
        id INTEGER PRIMARY KEY, peer TEXT NOT NULL, request_id TEXT NOT NULL, destination TEXT NOT NULL,
        studies TEXT NOT NULL, series TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'waiting', attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
        done_at REAL);
    CREATE INDEX forwards_waiting ON forwards (status) WHERE status = 'waiting';
    """,
]
