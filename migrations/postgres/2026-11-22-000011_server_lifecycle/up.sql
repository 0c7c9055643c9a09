-- The server lifecycle through the panel: how the panel reaches a node's wings, servers'
-- suspension and image, and per-tenant quotas.

-- wings' mutual-TLS API for the panel (https://{fqdn}:{api_port}).
ALTER TABLE nodes ADD COLUMN api_port BIGINT NOT NULL DEFAULT 8080;
-- The base URL browsers use for console sockets and signed downloads (wings'
-- api.public_listen), e.g. https://node1.example.com:8081.
ALTER TABLE nodes ADD COLUMN public_url TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN sftp_port BIGINT NOT NULL DEFAULT 2022;
UPDATE nodes SET public_url = 'http://' || fqdn || ':8081' WHERE public_url = '';

-- Set by an operator: a suspended server cannot be started.
ALTER TABLE servers ADD COLUMN suspended_at BIGINT;
-- The blueprint image the server runs (NULL: the blueprint's first).
ALTER TABLE servers ADD COLUMN image TEXT;
CREATE INDEX servers_tenant_status ON servers (tenant_id, status);

-- Per-tenant quotas; NULL takes the panel's [quotas] default. Every create first bumps
-- quota_seq: that write takes the tenant's row lock (PostgreSQL) or the write lock (SQLite),
-- so the count and sums it then reads include every create committed before it.
ALTER TABLE tenants ADD COLUMN max_servers BIGINT;
ALTER TABLE tenants ADD COLUMN max_memory_mb BIGINT;
ALTER TABLE tenants ADD COLUMN max_cpu_percent BIGINT;
ALTER TABLE tenants ADD COLUMN max_disk_mb BIGINT;
ALTER TABLE tenants ADD COLUMN quota_seq BIGINT NOT NULL DEFAULT 0;
