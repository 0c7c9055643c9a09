-- Node PKI (ADR 0009). The panel's private keys (node CA, token signing) sealed under the
-- master key; enrollment tokens stored as digests; every certificate issued to a node, by
-- fingerprint, so a node is admitted only while its certificate here is live.
CREATE TABLE panel_keys (
    name TEXT PRIMARY KEY NOT NULL,
    public_pem TEXT NOT NULL,
    sealed_private TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE node_enrollment_tokens (
    token_hash TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX node_enrollment_tokens_node ON node_enrollment_tokens (node_id);

CREATE TABLE node_certificates (
    fingerprint TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    -- Unix seconds, as in the certificate; the others are milliseconds like every timestamp.
    not_after BIGINT NOT NULL,
    superseded_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX node_certificates_node ON node_certificates (node_id);
