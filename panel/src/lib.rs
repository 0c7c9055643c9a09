//! The Mamba control plane: storage, identity, tenants and the REST API.
//!
//! Code map: `config` (typed settings), `db` (pool, schema, migrations; every query runs on
//! the blocking pool), `ids` (typed ids), `audit` (append-only log written in the same
//! transaction as each change), `users`, `password` (argon2id), `pagination` (cursors),
//! `request_meta` (client address behind trusted proxies), `events` (the cross-replica event
//! bus), `nodes`, `allocation` (address pools and atomic placement), `servers`, `blueprints`
//! and `eggs` (the blueprint registry and the egg importer), `metrics_store` (servers' samples
//! and hourly rollups), `node_pki` (the node CA, enrollment tokens and node certificates), `telemetry`
//! (heartbeats, node online/offline, server events, utilisation), `notify` (the signed
//! event webhook), `ssh_keys` (users' SSH public keys) and `sftp_auth` (the SFTP credential
//! check nodes ask for),
//! `metrics` and `http` (actix-web
//! routes and the JSON error envelope in `error`).

pub mod activity;
pub mod allocation;
pub mod api_keys;
pub mod audit;
pub mod authz;
pub mod backups;
pub mod blueprints;
pub mod config;
pub mod console_token;
pub mod db;
pub mod eggs;
pub mod error;
pub mod events;
pub mod http;
pub mod identity;
pub mod ids;
pub mod jobs;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod metrics_store;
pub mod node_pki;
pub mod nodes;
pub mod notify;
pub mod openapi;
pub mod pagination;
pub mod password;
pub mod permissions;
pub mod provisioning;
pub mod ratelimit;
pub mod request_meta;
pub mod revocation;
pub mod secrets;
pub mod servers;
pub mod sftp_auth;
pub mod ssh_keys;
pub mod telemetry;
pub mod tenants;
pub mod tokens;
pub mod users;
pub mod wings_client;
