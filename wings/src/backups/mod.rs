//! Backups: archives of a server's files streamed to a local folder or an S3 bucket, and
//! restores from them. See docs/adr/0007-backups.md for the format and the guarantees.

pub mod crypto;
pub mod format;
pub mod pipeline;
pub mod record;
pub mod service;
pub mod store;
pub mod tree;
