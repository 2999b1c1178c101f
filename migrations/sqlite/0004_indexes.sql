-- Covering indexes for the fleet-wide gauges (counts per health, quiet connections).
CREATE INDEX connections_active_health ON connections (active, health);
CREATE INDEX connections_active_quiet ON connections (active, quiet);
CREATE INDEX relay_outbox_state ON relay_outbox (state);
