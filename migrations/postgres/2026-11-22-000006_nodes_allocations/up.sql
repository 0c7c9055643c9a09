-- Nodes (the hosts wings runs on), their address pools, the servers placed on them and the
-- allocations (ip, port) those servers hold.
--
-- Capacity is counted from the servers on a node, never kept in a counter that could drift.
-- A reservation first bumps its node's reservation_seq: that write takes the node's row lock
-- (PostgreSQL) or the database's write lock (SQLite) before anything is read, so two
-- reservations on one node run one after the other and always see each other's rows.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    fqdn TEXT NOT NULL,
    location TEXT NOT NULL,
    -- 100 per core, like server limits.
    cpu_percent BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    -- Servers may together use up to capacity * (100 + overallocation_percent) / 100.
    overallocation_percent BIGINT NOT NULL DEFAULT 0,
    is_public BOOLEAN NOT NULL,
    maintenance BOOLEAN NOT NULL,
    -- active | decommissioned
    status TEXT NOT NULL,
    reservation_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    decommissioned_at BIGINT
);
CREATE INDEX nodes_location ON nodes (location);

-- One pool: an IP (or a CIDR block) times a port range, for some protocols. Pools of one
-- node never overlap (checked when a pool is added; a wildcard address overlaps every IP).
CREATE TABLE allocation_pools (
    id TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    -- A single address or a CIDR block, as given.
    ips TEXT NOT NULL,
    port_start INTEGER NOT NULL,
    port_end INTEGER NOT NULL,
    -- tcp | udp | tcp,udp
    protocols TEXT NOT NULL,
    -- sequential | random
    strategy TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    CHECK (port_start >= 1 AND port_end <= 65535 AND port_start <= port_end)
);
CREATE INDEX allocation_pools_node ON allocation_pools (node_id);

-- The minimal server record that owns allocations; the full lifecycle builds on it.
CREATE TABLE servers (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    node_id TEXT NOT NULL REFERENCES nodes (id),
    name TEXT NOT NULL,
    blueprint TEXT NOT NULL,
    memory_mb BIGINT NOT NULL,
    cpu_percent BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    -- A JSON object of variable values, checked against the blueprint's rules.
    variables TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX servers_tenant ON servers (tenant_id);
CREATE INDEX servers_node ON servers (node_id);

-- server_id has no foreign key on purpose: a server can vanish without its allocations
-- (a tenant deleted, a failed job), and the leak scanner finds and releases those.
-- UNIQUE (node_id, ip, port) is the invariant "a port is never given out twice".
CREATE TABLE allocations (
    id TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    pool_id TEXT NOT NULL REFERENCES allocation_pools (id),
    ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    protocols TEXT NOT NULL,
    server_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    is_primary BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (node_id, ip, port)
);
CREATE INDEX allocations_server ON allocations (server_id);
CREATE INDEX allocations_pool ON allocations (pool_id);
