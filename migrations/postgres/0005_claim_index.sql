-- The due-connection claim (every scheduler turn) reads active connections in next_due
-- order. With only the partial index on next_due, SQLite's planner preferred
-- connections_active_quiet (active = ?) and sorted every active connection on each turn
-- (100,000 rows five times a second); (active, next_due) answers it with a range scan.
DROP INDEX connections_due;
CREATE INDEX connections_active_due ON connections (active, next_due);
