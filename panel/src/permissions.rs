//! The permission catalogue and the built-in roles. A role is a set of permission keys.
//!
//! Server keys use the names wings checks on its console socket and file API
//! (`control.console`, `file.read`, ...), so the panel can hand a member's keys straight to
//! the node in a console token.

use std::collections::BTreeSet;

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Permission {
    pub key: &'static str,
    pub group: &'static str,
    pub description: &'static str,
}

const fn p(key: &'static str, group: &'static str, description: &'static str) -> Permission {
    Permission {
        key,
        group,
        description,
    }
}

pub const CATALOGUE: &[Permission] = &[
    p("websocket.connect", "console", "Open a server's console socket"),
    p("control.console", "console", "Send console commands"),
    p("control.start", "power", "Start servers"),
    p("control.stop", "power", "Stop and kill servers"),
    p("control.restart", "power", "Restart servers"),
    p(
        "admin.websocket.install",
        "console",
        "See install output on the console socket",
    ),
    p(
        "admin.websocket.errors",
        "console",
        "See detailed daemon errors on the console socket",
    ),
    p("file.read", "files", "List files"),
    p("file.read-content", "files", "Read and download file contents"),
    p("file.create", "files", "Create and upload files"),
    p("file.update", "files", "Edit, rename and move files"),
    p("file.delete", "files", "Delete files"),
    p("backup.read", "backups", "List backups"),
    p("backup.create", "backups", "Create backups"),
    p("backup.download", "backups", "Download backups"),
    p("backup.restore", "backups", "Restore backups"),
    p("backup.delete", "backups", "Delete, lock and unlock backups"),
    p("schedule.read", "schedules", "See schedules"),
    p("schedule.create", "schedules", "Create schedules"),
    p("schedule.update", "schedules", "Change schedules and their tasks"),
    p("schedule.delete", "schedules", "Delete schedules"),
    p(
        "allocation.read",
        "allocations",
        "See a server's addresses and ports",
    ),
    p("allocation.create", "allocations", "Add ports to a server"),
    p(
        "allocation.update",
        "allocations",
        "Change port notes and the primary port",
    ),
    p("allocation.delete", "allocations", "Remove ports from a server"),
    p("startup.read", "startup", "See startup variables"),
    p("startup.update", "startup", "Change startup variables"),
    p("startup.docker-image", "startup", "Change the server image"),
    p("settings.rename", "settings", "Rename servers"),
    p("settings.reinstall", "settings", "Reinstall servers"),
    p("activity.read", "activity", "See servers' activity"),
    p("server.read", "servers", "See servers, their status and metrics"),
    p("server.create", "servers", "Create servers"),
    p(
        "server.update",
        "servers",
        "Change servers' limits (within the tenant's quota)",
    ),
    p("server.delete", "servers", "Delete servers"),
    p("member.read", "members", "See members and invitations"),
    p(
        "member.invite",
        "members",
        "Invite members and withdraw invitations",
    ),
    p("member.update", "members", "Change members' roles"),
    p("member.remove", "members", "Remove members"),
    p("role.read", "roles", "See roles"),
    p("role.manage", "roles", "Create and delete custom roles"),
    p("billing.read", "billing", "See invoices and the plan"),
    p("billing.manage", "billing", "Change the plan and payment methods"),
    p("audit.read", "audit", "Read the audit log"),
    p("apikey.read", "api_keys", "See the tenant's API keys"),
    p(
        "apikey.manage",
        "api_keys",
        "Create and revoke one's own API keys",
    ),
    p(
        "tenant.update",
        "tenant",
        "Rename the tenant and change its security settings",
    ),
];

pub fn is_known(key: &str) -> bool {
    CATALOGUE.iter().any(|p| p.key == key)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BuiltInRole {
    #[serde(rename = "OWNER")]
    Owner,
    #[serde(rename = "ADMIN")]
    Admin,
    #[serde(rename = "SUPPORT")]
    Support,
    #[serde(rename = "MEMBER")]
    Member,
}

pub const BUILT_IN: [BuiltInRole; 4] = [
    BuiltInRole::Owner,
    BuiltInRole::Admin,
    BuiltInRole::Support,
    BuiltInRole::Member,
];

const SUPPORT: &[&str] = &[
    "server.read",
    "websocket.connect",
    "control.console",
    "admin.websocket.errors",
    "file.read",
    "file.read-content",
    "backup.read",
    "schedule.read",
    "allocation.read",
    "startup.read",
    "activity.read",
    "member.read",
    "role.read",
    "audit.read",
];

const MEMBER: &[&str] = &[
    "server.read",
    "websocket.connect",
    "control.console",
    "control.start",
    "control.stop",
    "control.restart",
    "file.read",
    "file.read-content",
    "file.create",
    "file.update",
    "file.delete",
    "backup.read",
    "backup.create",
    "backup.download",
    "backup.restore",
    "schedule.read",
    "schedule.create",
    "schedule.update",
    "schedule.delete",
    "allocation.read",
    "startup.read",
    "activity.read",
    "member.read",
    "role.read",
    "apikey.manage",
];

impl BuiltInRole {
    pub fn name(self) -> &'static str {
        match self {
            BuiltInRole::Owner => "OWNER",
            BuiltInRole::Admin => "ADMIN",
            BuiltInRole::Support => "SUPPORT",
            BuiltInRole::Member => "MEMBER",
        }
    }

    pub fn parse(name: &str) -> Option<BuiltInRole> {
        BUILT_IN.into_iter().find(|r| r.name() == name)
    }

    pub fn permissions(self) -> BTreeSet<String> {
        let keys: Vec<&str> = match self {
            BuiltInRole::Owner => CATALOGUE.iter().map(|p| p.key).collect(),
            // Everything but the bill: only owners pay, and so only owners make owners.
            BuiltInRole::Admin => CATALOGUE
                .iter()
                .map(|p| p.key)
                .filter(|k| *k != "billing.manage")
                .collect(),
            BuiltInRole::Support => SUPPORT.to_vec(),
            BuiltInRole::Member => MEMBER.to_vec(),
        };
        keys.into_iter().map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_roles_use_only_catalogue_keys_and_nest() {
        for role in BUILT_IN {
            for key in role.permissions() {
                assert!(is_known(&key), "{key} of {role:?} is not in the catalogue");
            }
        }
        let owner = BuiltInRole::Owner.permissions();
        let admin = BuiltInRole::Admin.permissions();
        assert!(admin.is_subset(&owner) && admin != owner);
        assert!(BuiltInRole::Member.permissions().is_subset(&admin));
        assert!(BuiltInRole::Support.permissions().is_subset(&admin));
        let keys: BTreeSet<&str> = CATALOGUE.iter().map(|p| p.key).collect();
        assert_eq!(keys.len(), CATALOGUE.len(), "no key twice");
        for node_key in [
            "control.console",
            "control.start",
            "control.stop",
            "control.restart",
            "file.read",
            "file.read-content",
            "file.create",
            "file.update",
            "file.delete",
            "websocket.connect",
            "admin.websocket.install",
            "admin.websocket.errors",
        ] {
            assert!(keys.contains(node_key), "{node_key} must keep the node's name");
        }
    }
}
