-- Servers' backups through the panel. The archive lives on the server's node (its local
-- folder or S3); this row is the panel's view of it, written with the job that makes it.
-- Deleting a server removes its rows (wings deletes the archives with the server).
CREATE TABLE server_backups (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    server_id TEXT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    -- `local` or `s3` (wings' store), from the panel's [backups] adapter.
    adapter TEXT NOT NULL,
    -- A JSON array of gitignore-style patterns.
    ignore_patterns TEXT NOT NULL,
    -- pending, running, completed, failed, restoring or deleting.
    status TEXT NOT NULL,
    size_bytes BIGINT,
    sha256 TEXT,
    -- The archive's AES-256 key (base64), sealed under the tenant's data key; NULL when the
    -- backup is not encrypted. Wings never stores it.
    sealed_key TEXT,
    error TEXT,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX server_backups_server ON server_backups (server_id, id);
CREATE INDEX server_backups_tenant ON server_backups (tenant_id);

-- Per-tenant override of [quotas] max_backups_per_server (NULL: the default).
ALTER TABLE tenants ADD COLUMN max_backups_per_server BIGINT;
