-- Webhooks, quiet detection, polling for recent changes and the relay outbox.
ALTER TABLE connections ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN expected_webhook_ms BIGINT;
ALTER TABLE connections ADD COLUMN last_webhook_at BIGINT;
ALTER TABLE connections ADD COLUMN quiet BIGINT NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN quiet_since BIGINT;
ALTER TABLE connections ADD COLUMN watermark BIGINT;
ALTER TABLE connections ADD COLUMN next_poll_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN poll_since BIGINT;
ALTER TABLE connections ADD COLUMN poll_cursor TEXT;
ALTER TABLE connections ADD COLUMN poll_max_seen BIGINT;
ALTER TABLE connections ADD COLUMN poll_lease_owner TEXT;
ALTER TABLE connections ADD COLUMN poll_lease_until BIGINT NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN last_poll_at BIGINT;
ALTER TABLE connections ADD COLUMN last_poll_result TEXT;
CREATE INDEX connections_quiet ON connections (quiet, next_poll_at);

-- Every delivery, kept at least 48 hours so the platform's retries are recognised.
CREATE TABLE webhook_events (
    platform TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    connection_id TEXT,
    remote_id TEXT,
    event_type TEXT,
    change_id TEXT,
    change_updated BIGINT,
    body TEXT NOT NULL,
    PRIMARY KEY (platform, webhook_id)
);
CREATE INDEX webhook_events_received ON webhook_events (received_at);

-- Changes known per connection, from webhooks or from polling (updated_at -1: unknown time).
CREATE TABLE seen_changes (
    connection_id TEXT NOT NULL,
    change_id TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    source TEXT NOT NULL,
    seen_at BIGINT NOT NULL,
    PRIMARY KEY (connection_id, change_id, updated_at)
);
CREATE INDEX seen_changes_seen ON seen_changes (seen_at);

-- Recovered changes waiting to be handed on.
CREATE TABLE relay_outbox (
    id BIGSERIAL PRIMARY KEY,
    webhook_id TEXT NOT NULL UNIQUE,
    connection_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at BIGINT
);
CREATE INDEX relay_outbox_due ON relay_outbox (state, next_attempt_at);
