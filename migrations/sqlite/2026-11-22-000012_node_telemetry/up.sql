-- Node telemetry (ADR 0011): heartbeats and the online/offline state they drive, the last
-- heartbeat's report, and the events wings reports about servers, with their webhook
-- delivery state.
ALTER TABLE nodes ADD COLUMN last_heartbeat_at BIGINT;
-- `new` (never heard from), `online` or `offline` (missed heartbeats for too long).
ALTER TABLE nodes ADD COLUMN connectivity TEXT NOT NULL DEFAULT 'new';

CREATE TABLE node_heartbeats (
    node_id TEXT PRIMARY KEY NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    received_at BIGINT NOT NULL,
    -- The heartbeat as wings sent it (JSON).
    report TEXT NOT NULL
);

CREATE TABLE server_events (
    id TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL,
    -- wings' id for the event: a re-delivery from the same node is stored once.
    event_id TEXT NOT NULL,
    server_id TEXT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    -- Webhook delivery: NULL until delivered (or when no webhook was configured, the time
    -- it was stored).
    notified_at BIGINT,
    notify_attempts BIGINT NOT NULL DEFAULT 0,
    notify_next_at BIGINT NOT NULL DEFAULT 0,
    UNIQUE (node_id, event_id)
);
CREATE INDEX server_events_server ON server_events (tenant_id, server_id, id);
CREATE INDEX server_events_pending ON server_events (notify_next_at) WHERE notified_at IS NULL;
