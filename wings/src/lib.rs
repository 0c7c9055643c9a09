//! The Mamba node daemon. See ARCHITECTURE.md for the map.

pub mod activity;
pub mod api;
pub mod backups;
pub mod config;
pub mod config_files;
pub mod docker;
pub mod files;
pub mod node_identity;
pub mod rcon;
pub mod reporter;
pub mod server;
pub mod sftp;
pub mod system;
pub mod tokens;
pub mod websocket;
