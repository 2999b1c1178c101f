-- Connections, their current health and schedule, probe history, transitions, incidents.
-- Times are milliseconds since the Unix epoch (INTEGER) on both backends.
CREATE TABLE connections (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    platform TEXT NOT NULL,
    remote_id TEXT,
    active INTEGER NOT NULL DEFAULT 1,
    config_generation INTEGER NOT NULL DEFAULT 0,
    paused INTEGER NOT NULL DEFAULT 0,
    health TEXT NOT NULL DEFAULT 'unknown',
    health_since INTEGER NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    consecutive_auth_failures INTEGER NOT NULL DEFAULT 0,
    first_failure_at INTEGER,
    next_due INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_probe_at INTEGER,
    last_outcome TEXT,
    last_status INTEGER,
    last_latency_ms INTEGER,
    last_request_id TEXT,
    last_error_code TEXT,
    last_message TEXT,
    open_incident_id INTEGER
);
CREATE INDEX connections_due ON connections (next_due) WHERE active = 1;
CREATE INDEX connections_remote ON connections (platform, remote_id);

CREATE TABLE probe_results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    connection_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    latency_ms INTEGER NOT NULL,
    request_id TEXT,
    error_code TEXT,
    message TEXT
);
CREATE INDEX probe_results_connection ON probe_results (connection_id, at);
CREATE INDEX probe_results_at ON probe_results (at);

CREATE TABLE transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    connection_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    from_health TEXT NOT NULL,
    to_health TEXT NOT NULL,
    cause TEXT NOT NULL,
    outcome TEXT,
    error_code TEXT,
    request_id TEXT,
    first_failure_at INTEGER
);
CREATE INDEX transitions_connection ON transitions (connection_id, at);

CREATE TABLE incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    connection_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    closed_at INTEGER,
    first_failure_at INTEGER NOT NULL,
    error_code TEXT,
    request_id TEXT
);
CREATE INDEX incidents_connection ON incidents (connection_id, opened_at);
