-- Remediation sagas. Keep in step with ../sqlite/0002_remediations.sql.
CREATE TABLE remediations (
    id BIGSERIAL PRIMARY KEY,
    node_uuid TEXT NOT NULL,
    status TEXT NOT NULL,
    generation BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    doc TEXT NOT NULL
);
-- At most one active remediation per node, whoever starts it.
CREATE UNIQUE INDEX remediations_one_active ON remediations (node_uuid) WHERE status = 'active';
CREATE INDEX remediations_status ON remediations (status, id);
