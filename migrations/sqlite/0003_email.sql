-- Reauthorization emails: recipients on the connection, the outbox, platform storms.
ALTER TABLE connections ADD COLUMN contacts TEXT NOT NULL DEFAULT '';
ALTER TABLE connections ADD COLUMN reconnect_url TEXT;
ALTER TABLE connections ADD COLUMN operator_paused INTEGER NOT NULL DEFAULT 0;

-- One row per email: (incident, kind, sequence, recipient) is unique, so an email is
-- enqueued once whatever restarts or replicas do; delivery is at least once.
CREATE TABLE email_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe_key TEXT NOT NULL UNIQUE,
    message_id TEXT NOT NULL,
    incident_id INTEGER,
    connection_id TEXT,
    platform TEXT,
    kind TEXT NOT NULL,
    audience TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sequence INTEGER NOT NULL DEFAULT 0,
    payload TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    sent_at INTEGER
);
CREATE INDEX email_outbox_due ON email_outbox (state, next_attempt_at);
CREATE INDEX email_outbox_incident ON email_outbox (incident_id);

-- A platform-wide failure: staff get one digest, per-connection emails wait.
CREATE TABLE storms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    connections INTEGER NOT NULL
);
CREATE UNIQUE INDEX storms_open ON storms (platform) WHERE ended_at IS NULL;
