//! The console socket's messages: JSON text frames `{"event": "...", "args": [...]}` with the
//! event names Pterodactyl-style front ends already use, and the close codes wings sends.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Close codes. 1xxx are the protocol's own; 4xxx are Mamba's.
pub mod close {
    /// The client sent more messages than the rate limit allows, and kept on.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message larger than `websocket.max_message_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Binary frames are not part of the protocol.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The server already has `websocket.max_sockets_per_server` sockets.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The client was silent for too long (not even answering pings).
    pub const GOING_AWAY: u16 = 1001;
    /// No valid `auth` within `websocket.auth_timeout_secs` (also after the token expired).
    pub const AUTHENTICATION_FAILED: u16 = 4001;
    /// The user was deauthorized, or the token was put on the deny list.
    pub const ACCESS_REVOKED: u16 = 4003;
    /// The server was deleted.
    pub const SERVER_DELETED: u16 = 4004;
}

/// Client to wings.
pub mod inbound {
    pub const AUTH: &str = "auth";
    pub const SEND_COMMAND: &str = "send command";
    pub const SET_STATE: &str = "set state";
    pub const SEND_LOGS: &str = "send logs";
    pub const SEND_STATS: &str = "send stats";
}

/// Wings to client.
pub mod outbound {
    pub const AUTH_SUCCESS: &str = "auth success";
    pub const TOKEN_EXPIRING: &str = "token expiring";
    pub const TOKEN_EXPIRED: &str = "token expired";
    pub const JWT_ERROR: &str = "jwt error";
    pub const CONSOLE_OUTPUT: &str = "console output";
    pub const STATUS: &str = "status";
    pub const STATS: &str = "stats";
    pub const INSTALL_STARTED: &str = "install started";
    pub const INSTALL_OUTPUT: &str = "install output";
    pub const INSTALL_COMPLETED: &str = "install completed";
    pub const DAEMON_MESSAGE: &str = "daemon message";
    pub const DAEMON_ERROR: &str = "daemon error";
    pub const THROTTLED: &str = "throttled";
    /// `{"backup", "operation": "backup"|"restore", "files", "bytes", "total_bytes"}`.
    pub const BACKUP_PROGRESS: &str = "backup progress";
    /// `{"backup", "successful", "checksum", "checksum_type", "size", "error"}`.
    pub const BACKUP_COMPLETED: &str = "backup completed";
    /// `{"backup", "successful", "error"}`.
    pub const BACKUP_RESTORE_COMPLETED: &str = "backup restore completed";
}

/// The permissions events need, named as the panel names them.
pub mod permission {
    pub const CONNECT: &str = "websocket.connect";
    pub const CONSOLE: &str = "control.console";
    pub const START: &str = "control.start";
    pub const STOP: &str = "control.stop";
    pub const RESTART: &str = "control.restart";
    pub const INSTALL_OUTPUT: &str = "admin.websocket.install";
    pub const ERROR_DETAILS: &str = "admin.websocket.errors";
    pub const BACKUP_READ: &str = "backup.read";
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Inbound {
    pub event: String,
    #[serde(default)]
    pub args: Vec<Value>,
}

impl Inbound {
    /// The first argument, when it is a string.
    pub fn text_arg(&self) -> Option<&str> {
        self.args.first().and_then(Value::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outbound<'a> {
    pub event: &'a str,
    pub args: Vec<Value>,
}

pub fn encode(event: &str, args: Vec<Value>) -> String {
    // Serialising strings and numbers cannot fail; an empty object is a safe fallback.
    serde_json::to_string(&Outbound { event, args }).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_in_frames() {
        let frame = encode(outbound::CONSOLE_OUTPUT, vec!["\x1b[31mred\u{7}<b>".into()]);
        assert_eq!(
            frame,
            r#"{"event":"console output","args":["\u001b[31mred\u0007<b>"]}"#
        );
        let back: Inbound = serde_json::from_str(&frame).unwrap();
        assert_eq!(back.text_arg(), Some("\x1b[31mred\u{7}<b>"));
    }
}
