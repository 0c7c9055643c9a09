-- Activity on a server's files as its node reports it (file manager routes, signed-URL
-- uploads, SFTP): who did what, from where, when.
CREATE TABLE server_activity (
    -- The panel's UUIDv7: arrival order, which the tenant's pages follow.
    id TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL,
    -- wings' id for the entry: a re-delivered batch stores nothing twice.
    entry_id TEXT NOT NULL,
    server_id TEXT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    event TEXT NOT NULL,
    -- The panel's user id, or 'panel'.
    actor TEXT NOT NULL,
    ip TEXT,
    properties TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    UNIQUE (node_id, entry_id)
);
-- A server's entries by time (ids are time-ordered), and the retention prune.
CREATE INDEX server_activity_server ON server_activity (tenant_id, server_id, id);
CREATE INDEX server_activity_received ON server_activity (received_at);
