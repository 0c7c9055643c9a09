-- Resource samples that wings reports for each server, and their hourly rollups (what
-- billing meters).
--
-- Idempotence: a sample is keyed by (server_id, sampled_at), so a batch delivered twice
-- adds nothing the second time. Egress is a delta (bytes sent since the previous sample,
-- computed by wings, which sees container restarts reset the counter), so an hour's egress
-- is the sum of its samples' deltas and stays right across counter resets.
CREATE TABLE metric_samples (
    server_id TEXT NOT NULL,
    -- Milliseconds since the epoch, as wings took the sample.
    sampled_at BIGINT NOT NULL,
    -- The node that reported it (always the server's node at that time) and the server's
    -- tenant, copied so rollups stay right after the server is deleted.
    node_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    cpu_millicores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    egress_bytes BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL,
    uptime_s BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (server_id, sampled_at)
);
CREATE INDEX metric_samples_sampled_at ON metric_samples (sampled_at);

-- (server, hour) pairs whose samples changed since their hourly row was computed. Ingest
-- inserts them; the rollup recomputes those hours from the raw samples and deletes them.
-- Raw samples of an hour listed here are never pruned.
CREATE TABLE metric_dirty_hours (
    server_id TEXT NOT NULL,
    hour_start BIGINT NOT NULL,
    PRIMARY KEY (server_id, hour_start)
);
CREATE INDEX metric_dirty_hours_hour ON metric_dirty_hours (hour_start);

-- One row per server and hour, recomputed from the raw samples whenever a sample of that
-- hour arrives (also late ones), so running the rollup twice gives the same rows.
CREATE TABLE metric_hourly (
    server_id TEXT NOT NULL,
    hour_start BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    -- The node of the hour's last sample.
    node_id TEXT NOT NULL,
    sample_count BIGINT NOT NULL,
    cpu_millicores_avg BIGINT NOT NULL,
    cpu_millicores_max BIGINT NOT NULL,
    memory_mb_avg BIGINT NOT NULL,
    memory_mb_max BIGINT NOT NULL,
    disk_bytes_max BIGINT NOT NULL,
    disk_bytes_last BIGINT NOT NULL,
    egress_bytes BIGINT NOT NULL,
    uptime_s_last BIGINT NOT NULL,
    first_sampled_at BIGINT NOT NULL,
    last_sampled_at BIGINT NOT NULL,
    computed_at BIGINT NOT NULL,
    PRIMARY KEY (server_id, hour_start)
);
CREATE INDEX metric_hourly_tenant_hour ON metric_hourly (tenant_id, hour_start);

-- One row. A rollup's first statement updates it, which takes the row lock (PostgreSQL) or
-- the database's write lock (SQLite); an ingest first takes the same row FOR SHARE
-- (PostgreSQL) or bumps it (SQLite), so a rollup sees either all or none of a batch.
CREATE TABLE metric_rollup_state (
    id INTEGER PRIMARY KEY NOT NULL,
    runs BIGINT NOT NULL,
    -- Hours before this (ms) were rolled up by the last run.
    rolled_up_to BIGINT NOT NULL,
    last_run_at BIGINT NOT NULL,
    -- Bumped by every ingest on SQLite only (that write is its lock).
    ingests BIGINT NOT NULL
);
INSERT INTO metric_rollup_state (id, runs, rolled_up_to, last_run_at, ingests) VALUES (1, 0, 0, 0, 0);
