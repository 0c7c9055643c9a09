//! The one schema both backends share. Written by hand to match `migrations/*`; the
//! `schema_matches_migrations` test compares it with what the migrations create.

diesel::table! {
    users (id) {
        id -> Text,
        email -> Text,
        display_name -> Text,
        password_hash -> Text,
        email_verified_at -> Nullable<BigInt>,
        is_super_admin -> Bool,
        created_at -> BigInt,
        updated_at -> BigInt,
        totp_secret -> Nullable<Text>,
        totp_enabled_at -> Nullable<BigInt>,
        totp_last_step -> Nullable<BigInt>,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        token_hash -> Text,
        csrf_hash -> Text,
        user_id -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        ip -> Nullable<Text>,
        user_agent -> Nullable<Text>,
    }
}

diesel::table! {
    refresh_tokens (id) {
        id -> Text,
        token_hash -> Text,
        family_id -> Text,
        user_id -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    access_tokens (token_hash) {
        token_hash -> Text,
        family_id -> Text,
        user_id -> Text,
        expires_at -> BigInt,
    }
}

diesel::table! {
    login_challenges (id) {
        id -> Text,
        token_hash -> Text,
        user_id -> Text,
        client -> Text,
        expires_at -> BigInt,
        attempts -> Integer,
        used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    recovery_codes (id) {
        id -> Text,
        user_id -> Text,
        code_hash -> Text,
        used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    tenants (id) {
        id -> Text,
        slug -> Text,
        name -> Text,
        plan -> Text,
        status -> Text,
        require_two_factor -> Bool,
        created_at -> BigInt,
        updated_at -> BigInt,
        max_servers -> Nullable<BigInt>,
        max_memory_mb -> Nullable<BigInt>,
        max_cpu_percent -> Nullable<BigInt>,
        max_disk_mb -> Nullable<BigInt>,
        quota_seq -> BigInt,
        max_backups_per_server -> Nullable<BigInt>,
    }
}

diesel::table! {
    roles (id) {
        id -> Text,
        tenant_id -> Text,
        name -> Text,
        permissions -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    memberships (id) {
        id -> Text,
        tenant_id -> Text,
        user_id -> Text,
        role -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    invitations (id) {
        id -> Text,
        tenant_id -> Text,
        email -> Text,
        role -> Text,
        token_hash -> Text,
        invited_by -> Text,
        expires_at -> BigInt,
        accepted_at -> Nullable<BigInt>,
        created_at -> BigInt,
    }
}

diesel::table! {
    api_keys (id) {
        id -> Text,
        tenant_id -> Text,
        user_id -> Text,
        prefix -> Text,
        secret_hash -> Text,
        scopes -> Text,
        allowed_ips -> Text,
        memo -> Text,
        expires_at -> Nullable<BigInt>,
        last_used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        created_at -> BigInt,
    }
}

diesel::table! {
    tenant_keys (tenant_id) {
        tenant_id -> Text,
        wrapped_key -> Text,
        master_key_id -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    secrets (id) {
        id -> Text,
        tenant_id -> Text,
        name -> Text,
        ciphertext -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::joinable!(api_keys -> users (user_id));
diesel::joinable!(api_keys -> tenants (tenant_id));
diesel::joinable!(memberships -> users (user_id));
diesel::joinable!(memberships -> tenants (tenant_id));
diesel::joinable!(sessions -> users (user_id));
diesel::joinable!(access_tokens -> users (user_id));

diesel::table! {
    audit_log (id) {
        id -> Text,
        tenant_id -> Nullable<Text>,
        actor_type -> Text,
        actor_id -> Nullable<Text>,
        action -> Text,
        resource_type -> Text,
        resource_id -> Nullable<Text>,
        metadata -> Text,
        ip -> Nullable<Text>,
        user_agent -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    users,
    audit_log,
    sessions,
    refresh_tokens,
    access_tokens,
    login_challenges,
    recovery_codes,
    tenants,
    roles,
    memberships,
    invitations,
    api_keys,
    tenant_keys,
    secrets
);

diesel::table! {
    nodes (id) {
        id -> Text,
        name -> Text,
        fqdn -> Text,
        location -> Text,
        cpu_percent -> BigInt,
        memory_mb -> BigInt,
        disk_mb -> BigInt,
        overallocation_percent -> BigInt,
        is_public -> Bool,
        maintenance -> Bool,
        status -> Text,
        reservation_seq -> BigInt,
        created_at -> BigInt,
        updated_at -> BigInt,
        decommissioned_at -> Nullable<BigInt>,
        api_port -> BigInt,
        public_url -> Text,
        sftp_port -> BigInt,
        last_heartbeat_at -> Nullable<BigInt>,
        connectivity -> Text,
    }
}

diesel::table! {
    allocation_pools (id) {
        id -> Text,
        node_id -> Text,
        ips -> Text,
        port_start -> Integer,
        port_end -> Integer,
        protocols -> Text,
        strategy -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    servers (id) {
        id -> Text,
        tenant_id -> Text,
        node_id -> Text,
        name -> Text,
        blueprint -> Text,
        memory_mb -> BigInt,
        cpu_percent -> BigInt,
        disk_mb -> BigInt,
        variables -> Text,
        status -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
        suspended_at -> Nullable<BigInt>,
        image -> Nullable<Text>,
    }
}

diesel::table! {
    allocations (id) {
        id -> Text,
        node_id -> Text,
        pool_id -> Text,
        ip -> Text,
        port -> Integer,
        protocols -> Text,
        server_id -> Text,
        tenant_id -> Text,
        is_primary -> Bool,
        created_at -> BigInt,
    }
}

diesel::joinable!(allocation_pools -> nodes (node_id));
diesel::joinable!(servers -> nodes (node_id));
diesel::joinable!(servers -> tenants (tenant_id));
diesel::joinable!(allocations -> nodes (node_id));
diesel::joinable!(allocations -> allocation_pools (pool_id));

diesel::allow_tables_to_appear_in_same_query!(nodes, allocation_pools, servers, allocations, tenants);

diesel::table! {
    blueprints (slug) {
        slug -> Text,
        name -> Text,
        document -> Text,
        source_format -> Text,
        report -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    metric_samples (server_id, sampled_at) {
        server_id -> Text,
        sampled_at -> BigInt,
        node_id -> Text,
        tenant_id -> Text,
        cpu_millicores -> BigInt,
        memory_mb -> BigInt,
        egress_bytes -> BigInt,
        disk_bytes -> BigInt,
        uptime_s -> BigInt,
        received_at -> BigInt,
    }
}

diesel::table! {
    metric_dirty_hours (server_id, hour_start) {
        server_id -> Text,
        hour_start -> BigInt,
    }
}

diesel::table! {
    metric_hourly (server_id, hour_start) {
        server_id -> Text,
        hour_start -> BigInt,
        tenant_id -> Text,
        node_id -> Text,
        sample_count -> BigInt,
        cpu_millicores_avg -> BigInt,
        cpu_millicores_max -> BigInt,
        memory_mb_avg -> BigInt,
        memory_mb_max -> BigInt,
        disk_bytes_max -> BigInt,
        disk_bytes_last -> BigInt,
        egress_bytes -> BigInt,
        uptime_s_last -> BigInt,
        first_sampled_at -> BigInt,
        last_sampled_at -> BigInt,
        computed_at -> BigInt,
    }
}

diesel::table! {
    metric_rollup_state (id) {
        id -> Integer,
        runs -> BigInt,
        rolled_up_to -> BigInt,
        last_run_at -> BigInt,
        ingests -> BigInt,
    }
}

// Node PKI (migration 000008): the panel's sealed keys, enrollment tokens, node certificates.
diesel::table! {
    panel_keys (name) {
        name -> Text,
        public_pem -> Text,
        sealed_private -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    node_enrollment_tokens (token_hash) {
        token_hash -> Text,
        node_id -> Text,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
        created_at -> BigInt,
    }
}

diesel::table! {
    node_certificates (fingerprint) {
        fingerprint -> Text,
        node_id -> Text,
        not_after -> BigInt,
        superseded_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        created_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(panel_keys, node_enrollment_tokens, node_certificates);

diesel::table! {
    jobs (id) {
        id -> Text,
        tenant_id -> Nullable<Text>,
        server_id -> Nullable<Text>,
        kind -> Text,
        payload -> Text,
        status -> Text,
        attempts -> Integer,
        max_attempts -> Nullable<Integer>,
        run_after -> BigInt,
        lease_owner -> Nullable<Text>,
        lease_expires_at -> Nullable<BigInt>,
        last_error -> Nullable<Text>,
        step -> Nullable<Text>,
        progress -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
        finished_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    node_heartbeats (node_id) {
        node_id -> Text,
        received_at -> BigInt,
        report -> Text,
    }
}

diesel::table! {
    server_events (id) {
        id -> Text,
        node_id -> Text,
        event_id -> Text,
        server_id -> Text,
        tenant_id -> Text,
        kind -> Text,
        occurred_at -> BigInt,
        received_at -> BigInt,
        message -> Text,
        data -> Text,
        notified_at -> Nullable<BigInt>,
        notify_attempts -> BigInt,
        notify_next_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(nodes, node_heartbeats);
diesel::allow_tables_to_appear_in_same_query!(servers, server_events);

diesel::table! {
    server_activity (id) {
        id -> Text,
        node_id -> Text,
        entry_id -> Text,
        server_id -> Text,
        tenant_id -> Text,
        event -> Text,
        actor -> Text,
        ip -> Nullable<Text>,
        properties -> Text,
        occurred_at -> BigInt,
        received_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(servers, server_activity);

diesel::table! {
    user_ssh_keys (id) {
        id -> Text,
        user_id -> Text,
        name -> Text,
        algorithm -> Text,
        public_key -> Text,
        fingerprint -> Text,
        created_at -> BigInt,
    }
}

diesel::joinable!(user_ssh_keys -> users (user_id));
diesel::allow_tables_to_appear_in_same_query!(user_ssh_keys, users);

diesel::table! {
    server_backups (id) {
        id -> Text,
        tenant_id -> Text,
        server_id -> Text,
        name -> Text,
        adapter -> Text,
        ignore_patterns -> Text,
        status -> Text,
        size_bytes -> Nullable<BigInt>,
        sha256 -> Nullable<Text>,
        sealed_key -> Nullable<Text>,
        error -> Nullable<Text>,
        created_at -> BigInt,
        completed_at -> Nullable<BigInt>,
        updated_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(server_backups, servers);
