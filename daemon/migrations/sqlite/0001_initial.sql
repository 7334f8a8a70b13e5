-- Bearman schema, SQLite flavour. Keep in step with ../postgres/0001_initial.sql.
-- Columns that are filtered or constrained are real columns; the rest of a record is the
-- JSON document in `doc`.
CREATE TABLE nodes (
    uuid TEXT PRIMARY KEY NOT NULL,
    hostname TEXT NOT NULL UNIQUE,
    serial TEXT NOT NULL,
    rack TEXT,
    role TEXT NOT NULL,
    state TEXT NOT NULL,
    flavor TEXT,
    generation INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    last_heartbeat_at_ms INTEGER,
    doc TEXT NOT NULL
);
CREATE INDEX nodes_state ON nodes (state);
CREATE INDEX nodes_rack ON nodes (rack);
CREATE INDEX nodes_flavor ON nodes (flavor);

CREATE TABLE flavors (
    name TEXT PRIMARY KEY NOT NULL,
    doc TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE TABLE ip_pools (
    name TEXT PRIMARY KEY NOT NULL,
    purpose TEXT NOT NULL,
    doc TEXT NOT NULL
);

CREATE TABLE ip_allocations (
    pool TEXT NOT NULL REFERENCES ip_pools (name),
    address TEXT NOT NULL UNIQUE,
    address_num INTEGER NOT NULL,
    node_uuid TEXT NOT NULL,
    purpose TEXT NOT NULL,
    allocated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (pool, address_num),
    UNIQUE (node_uuid, purpose)
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    node_uuid TEXT,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    reason TEXT NOT NULL
);
CREATE INDEX events_node ON events (node_uuid, id);

CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
);
