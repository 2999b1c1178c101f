-- Connections, their current health and schedule, probe history, transitions, incidents.
-- Times are milliseconds since the Unix epoch (INTEGER) on both backends.
CREATE TABLE connections (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    platform TEXT NOT NULL,
    remote_id TEXT,
    active BIGINT NOT NULL DEFAULT 1,
    config_generation BIGINT NOT NULL DEFAULT 0,
    paused BIGINT NOT NULL DEFAULT 0,
    health TEXT NOT NULL DEFAULT 'unknown',
    health_since BIGINT NOT NULL,
    consecutive_failures BIGINT NOT NULL DEFAULT 0,
    consecutive_auth_failures BIGINT NOT NULL DEFAULT 0,
    first_failure_at BIGINT,
    next_due BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_probe_at BIGINT,
    last_outcome TEXT,
    last_status BIGINT,
    last_latency_ms BIGINT,
    last_request_id TEXT,
    last_error_code TEXT,
    last_message TEXT,
    open_incident_id BIGINT
);
CREATE INDEX connections_due ON connections (next_due) WHERE active = 1;
CREATE INDEX connections_remote ON connections (platform, remote_id);

CREATE TABLE probe_results (
    id BIGSERIAL PRIMARY KEY,
    connection_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    status BIGINT,
    latency_ms BIGINT NOT NULL,
    request_id TEXT,
    error_code TEXT,
    message TEXT
);
CREATE INDEX probe_results_connection ON probe_results (connection_id, at);
CREATE INDEX probe_results_at ON probe_results (at);

CREATE TABLE transitions (
    id BIGSERIAL PRIMARY KEY,
    connection_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    from_health TEXT NOT NULL,
    to_health TEXT NOT NULL,
    cause TEXT NOT NULL,
    outcome TEXT,
    error_code TEXT,
    request_id TEXT,
    first_failure_at BIGINT
);
CREATE INDEX transitions_connection ON transitions (connection_id, at);

CREATE TABLE incidents (
    id BIGSERIAL PRIMARY KEY,
    connection_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    opened_at BIGINT NOT NULL,
    closed_at BIGINT,
    first_failure_at BIGINT NOT NULL,
    error_code TEXT,
    request_id TEXT
);
CREATE INDEX incidents_connection ON incidents (connection_id, opened_at);
