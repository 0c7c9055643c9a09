-- Durable jobs (ADR 0010): work the panel must carry out on nodes, written in the same
-- transaction as the change that causes it and run by workers (`panel serve`, `panel worker`).
--
-- A worker claims a job by setting status 'running', its own id as lease_owner and a lease
-- deadline, which it renews while it works. A job whose lease ran out (its worker died) is
-- claimable again; steps are idempotent, so running one twice is safe. Jobs of one server
-- run one at a time, oldest (by id, a UUIDv7) first.
--
-- No foreign keys: a job outlives the server it deleted, and stays as history.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT,
    server_id TEXT,
    -- server_install, server_update, server_reinstall, server_delete, server_power, server_backup
    kind TEXT NOT NULL,
    -- JSON; small, since workers read the current rows.
    payload TEXT NOT NULL,
    -- queued, running, succeeded, failed (permanent error), dead (retries exhausted)
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    -- NULL: the worker's configured jobs.max_attempts.
    max_attempts INTEGER,
    -- Milliseconds since the epoch before which a queued job is not claimed (backoff).
    run_after BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    last_error TEXT,
    -- The last step the job completed, and the step's JSON state, so a resumed job continues.
    step TEXT,
    progress TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX jobs_status_run_after ON jobs (status, run_after);
CREATE INDEX jobs_server ON jobs (server_id, id);
CREATE INDEX jobs_kind ON jobs (kind, id);
