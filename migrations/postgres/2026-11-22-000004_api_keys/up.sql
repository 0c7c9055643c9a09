-- API keys: made by a user within a tenant. The visible prefix identifies a key; only the
-- SHA-256 digest of the whole key is stored.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    prefix TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    -- JSON arrays: scopes, and addresses or CIDR ranges allowed to use the key (empty: any).
    scopes TEXT NOT NULL,
    allowed_ips TEXT NOT NULL,
    memo TEXT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
CREATE INDEX api_keys_user ON api_keys (user_id);
