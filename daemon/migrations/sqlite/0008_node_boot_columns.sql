-- The boot watchdog's view of a node as columns of its own. Keep in step with
-- ../postgres/0008_node_boot_columns.sql.
-- The watchdog reads every booting node every `boot_scan_ms`; in a boot storm of
-- 10,000 nodes, decoding each node's whole document for two fields was most of what
-- the daemon did between requests (store::sql::nodes::booting_list).
-- Generated from the document by the database, so no writer sets them and every writer
-- keeps them true, a previous release's during a rolling upgrade included; `doc` stays
-- the record. (SQLite adds only VIRTUAL generated columns; the index below stores them.)
-- `boot`: the document's `boot` (a JSON object) as text, NULL when it has none.
-- `bmc_address`: the document's `bmc.address`, NULL when it has none.
ALTER TABLE nodes ADD COLUMN boot TEXT GENERATED ALWAYS AS (
    CASE WHEN json_type(doc, '$.boot') = 'object' THEN json_extract(doc, '$.boot') END
) VIRTUAL;
ALTER TABLE nodes ADD COLUMN bmc_address TEXT GENERATED ALWAYS AS (
    CASE WHEN json_type(doc, '$.bmc.address') = 'text' THEN json_extract(doc, '$.bmc.address') END
) VIRTUAL;
-- The scan reads this index (state first, so only the booting nodes' entries), never
-- the documents.
CREATE INDEX nodes_booting ON nodes (state, uuid, rack, boot, bmc_address);
