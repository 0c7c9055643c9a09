//! The activity log: who did what to a server's files (file manager routes, signed-URL
//! uploads, SFTP). Entries go to the reporter through `Context::activity` and from there,
//! through the outbox, to the panel (`mamba_shared::activity`).
//!
//! Recording never blocks or fails the action: without a subscriber (not enrolled) an entry is
//! simply not kept, and a reporter that falls behind loses the oldest (logged).

use std::net::IpAddr;

use mamba_shared::activity::{
    ACTOR_PANEL, ActivityEntry, MAX_ACTIVITY_ACTOR_CHARS, MAX_ACTIVITY_PROPERTIES_BYTES,
};
use mamba_shared::ids::ServerId;

use crate::server::Context;

/// Paths listed in one entry's properties; the rest are counted.
pub const MAX_LISTED_PATHS: usize = 20;
/// Longest path kept in properties (characters).
const MAX_PATH_CHARS: usize = 256;

/// Who acted, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The panel's user id, or [`ACTOR_PANEL`].
    pub user: String,
    pub ip: Option<IpAddr>,
}

impl Actor {
    pub fn panel() -> Actor {
        Actor {
            user: ACTOR_PANEL.to_string(),
            ip: None,
        }
    }

    /// A user the panel named; an unusable name (empty, too long, control characters) is
    /// recorded as the panel.
    pub fn user(user: &str, ip: Option<IpAddr>) -> Actor {
        let usable = !user.is_empty()
            && user.chars().count() <= MAX_ACTIVITY_ACTOR_CHARS
            && !user.chars().any(char::is_control);
        if usable {
            Actor {
                user: user.to_string(),
                ip,
            }
        } else {
            Actor { ip, ..Actor::panel() }
        }
    }
}

/// A path as properties show it, cut to a bounded length.
pub fn shown_path(path: &str) -> String {
    path.chars().take(MAX_PATH_CHARS).collect()
}

/// At most [`MAX_LISTED_PATHS`] paths, each cut to a bounded length.
pub fn shown_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    paths.into_iter().take(MAX_LISTED_PATHS).map(shown_path).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Records one action on `server`.
pub fn record(ctx: &Context, server: &ServerId, event: &str, actor: &Actor, properties: serde_json::Value) {
    // Over the wire bound the panel would refuse it whole; keep the fact, drop the detail.
    let fits = serde_json::to_vec(&properties).is_ok_and(|b| b.len() <= MAX_ACTIVITY_PROPERTIES_BYTES);
    let properties = if fits {
        properties
    } else {
        serde_json::json!({ "truncated": true })
    };
    let entry = ActivityEntry {
        id: uuid::Uuid::now_v7().to_string(),
        server_id: server.to_string(),
        event: event.to_string(),
        actor: actor.user.clone(),
        ip: actor.ip.map(|ip| ip.to_string()),
        properties,
        at_ms: now_ms(),
    };
    tracing::debug!(server.id = %server, event, actor = %actor.user, "activity");
    // No subscriber (not enrolled): nothing to report to.
    let _ = ctx.activity.send(entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_user_names_fall_back_to_the_panel() {
        assert_eq!(Actor::user("u-1", None).user, "u-1");
        assert_eq!(Actor::user("", None).user, ACTOR_PANEL);
        assert_eq!(Actor::user("a\nb", None).user, ACTOR_PANEL);
        assert_eq!(Actor::user(&"x".repeat(500), None).user, ACTOR_PANEL);
    }

    #[test]
    fn path_lists_are_bounded() {
        let many: Vec<String> = (0..100).map(|i| format!("{i}{}", "p".repeat(1000))).collect();
        let shown = shown_paths(many.iter().map(String::as_str));
        assert_eq!(shown.len(), MAX_LISTED_PATHS);
        assert!(shown.iter().all(|p| p.chars().count() == 256));
    }
}
