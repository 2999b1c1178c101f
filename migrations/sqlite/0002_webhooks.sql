-- Webhooks, quiet detection, polling for recent changes and the relay outbox.
ALTER TABLE connections ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN expected_webhook_ms INTEGER;
ALTER TABLE connections ADD COLUMN last_webhook_at INTEGER;
ALTER TABLE connections ADD COLUMN quiet INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN quiet_since INTEGER;
ALTER TABLE connections ADD COLUMN watermark INTEGER;
ALTER TABLE connections ADD COLUMN next_poll_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN poll_since INTEGER;
ALTER TABLE connections ADD COLUMN poll_cursor TEXT;
ALTER TABLE connections ADD COLUMN poll_max_seen INTEGER;
ALTER TABLE connections ADD COLUMN poll_lease_owner TEXT;
ALTER TABLE connections ADD COLUMN poll_lease_until INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN last_poll_at INTEGER;
ALTER TABLE connections ADD COLUMN last_poll_result TEXT;
CREATE INDEX connections_quiet ON connections (quiet, next_poll_at);

-- Every delivery, kept at least 48 hours so the platform's retries are recognised.
CREATE TABLE webhook_events (
    platform TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    connection_id TEXT,
    remote_id TEXT,
    event_type TEXT,
    change_id TEXT,
    change_updated INTEGER,
    body TEXT NOT NULL,
    PRIMARY KEY (platform, webhook_id)
);
CREATE INDEX webhook_events_received ON webhook_events (received_at);

-- Changes known per connection, from webhooks or from polling (updated_at -1: unknown time).
CREATE TABLE seen_changes (
    connection_id TEXT NOT NULL,
    change_id TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    source TEXT NOT NULL,
    seen_at INTEGER NOT NULL,
    PRIMARY KEY (connection_id, change_id, updated_at)
);
CREATE INDEX seen_changes_seen ON seen_changes (seen_at);

-- Recovered changes waiting to be handed on.
CREATE TABLE relay_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL UNIQUE,
    connection_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    sent_at INTEGER
);
CREATE INDEX relay_outbox_due ON relay_outbox (state, next_attempt_at);
