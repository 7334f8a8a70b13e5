-- Several daemons on one database (PostgreSQL in production; SQLite holds the same
-- tables so both backends run one set of queries). Keep in step with
-- ../sqlite/0004_cluster.sql.
-- The controller's lease: one row, its expiry on the database's clock; `epoch` grows with
-- every new term and is the fencing token saga writes are checked against;
-- `controller_memory` is what the holder's controller remembers between ticks (the guards'
-- hold, the rate window), saved with each renewal and handed to the next holder.
CREATE TABLE leader_lease (
    name TEXT PRIMARY KEY NOT NULL,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    acquired_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    controller_memory TEXT
);
-- Replicas that reported in, for `bearman cluster status`.
CREATE TABLE replicas (
    name TEXT PRIMARY KEY NOT NULL,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    last_seen_at_ms BIGINT NOT NULL
);
