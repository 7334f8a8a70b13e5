-- The boot watchdog's view of a node as columns of its own. Keep in step with
-- ../postgres/0008_node_boot_columns.sql.
-- The watchdog reads every booting node every `boot_scan_ms`; in a boot storm of
-- 10,000 nodes, decoding each node's whole document for two fields was most of what
-- the daemon did between requests. Every node write sets both (store::sql::nodes);
-- `doc` stays the record.
-- `boot`: the document's `boot` (a JSON object), NULL when it has none.
-- `bmc_address`: the document's `bmc.address`, NULL when it has none.
ALTER TABLE nodes ADD COLUMN boot TEXT;
ALTER TABLE nodes ADD COLUMN bmc_address TEXT;
UPDATE nodes SET
    boot = CASE WHEN json_type(doc, '$.boot') = 'object' THEN json_extract(doc, '$.boot') END,
    bmc_address = CASE WHEN json_type(doc, '$.bmc.address') = 'text'
        THEN json_extract(doc, '$.bmc.address') END;
-- The scan reads this index alone (state first, so only the booting nodes' entries),
-- never the table.
CREATE INDEX nodes_booting ON nodes (state, uuid, rack, boot, bmc_address);
