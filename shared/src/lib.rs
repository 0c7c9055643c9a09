//! Types and protocol that the Mamba panel and wings both speak.
//!
//! Architecture invariant: this crate knows no database, no web framework and no Docker
//! client. It is plain data plus validation, so both sides can depend on it freely.

pub mod activity;
pub mod blueprint;
pub mod error;
pub mod files_api;
pub mod ids;
pub mod metrics;
pub mod node_api;
pub mod node_sftp;
pub mod pki;
pub mod rules;
pub mod template;
pub mod variables;
pub mod wings_api;
