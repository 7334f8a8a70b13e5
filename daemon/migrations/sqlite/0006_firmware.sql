-- Firmware bundles and the fleet's firmware rollout. Keep in step with
-- ../postgres/0006_firmware.sql.
-- A bundle is a named JSON document like a flavor (`core::firmware::FirmwareBundle`).
CREATE TABLE firmware_bundles (
    name TEXT PRIMARY KEY NOT NULL,
    doc TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
-- The rollout: one row (`id` = 1) holding who is flashing, each bundle's tally and the
-- pause (`core::firmware::FirmwareRollout`). `generation` grows with every write; a
-- write presents the one it read, so two replicas never both take the last slot.
CREATE TABLE firmware_rollout (
    id INTEGER PRIMARY KEY NOT NULL,
    generation INTEGER NOT NULL,
    doc TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
