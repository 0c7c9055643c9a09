-- Users' SSH public keys, for SFTP logins on the nodes. The key is kept in OpenSSH form
-- (type, base64, no comment); the fingerprint (`SHA256:...`) is what a login looks up.
CREATE TABLE user_ssh_keys (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    public_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX user_ssh_keys_user_fingerprint ON user_ssh_keys (user_id, fingerprint);
