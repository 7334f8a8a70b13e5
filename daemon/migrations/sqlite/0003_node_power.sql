-- Power sync: the last BMC power reading of each node. Keep in step with
-- ../postgres/0003_node_power.sql.
-- A table of its own rather than node columns: a poll must never bump a node's
-- generation (and so conflict with operator edits) nor invalidate the node cache; the
-- controller's health list joins it.
CREATE TABLE node_power (
    node_uuid TEXT PRIMARY KEY NOT NULL REFERENCES nodes (uuid),
    state TEXT NOT NULL,
    read_at_ms INTEGER NOT NULL,
    error TEXT
);
