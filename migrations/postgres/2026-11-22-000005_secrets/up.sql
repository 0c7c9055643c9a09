-- Envelope encryption: each tenant's data key, wrapped (AES-256-GCM) by the master key from
-- the environment; and secrets encrypted with their tenant's data key. master_key_id names
-- the master key that wrapped a data key, so a rotation can resume where it stopped.
CREATE TABLE tenant_keys (
    tenant_id TEXT PRIMARY KEY NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    wrapped_key TEXT NOT NULL,
    master_key_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE secrets (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
