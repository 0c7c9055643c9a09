//! Typed ids, so a tenant id can never be passed where a user id is expected.
//!
//! Every id is a UUIDv7 stored as text: time-ordered, which cursor pagination relies on.

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh id, later than every id made before it.
            pub fn generate() -> $name {
                $name(uuid::Uuid::now_v7().to_string())
            }

            /// `None` for anything that is not a UUID: such an id cannot exist, so callers
            /// answer 404 as for any other missing id.
            pub fn parse(s: &str) -> Option<$name> {
                uuid::Uuid::parse_str(s).ok().map(|u| $name(u.to_string()))
            }

            /// For ids read back from the database, which only ever holds valid ones.
            pub fn from_db(s: String) -> $name {
                $name(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<$name, String> {
                $name::parse(&s).ok_or_else(|| format!("{s:?} is not a valid id"))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(
    /// A person with a login.
    UserId
);
id_type!(
    /// An organisation: the unit that owns servers, members, keys and the bill.
    TenantId
);
id_type!(
    /// One audit-log entry.
    AuditId
);
id_type!(
    /// One user's membership of one tenant.
    MembershipId
);
id_type!(
    /// A tenant's custom role.
    RoleId
);
id_type!(
    /// A pending invitation to join a tenant.
    InvitationId
);
id_type!(
    /// A host running wings.
    NodeId
);
id_type!(
    /// One address pool of a node.
    PoolId
);
id_type!(
    /// One (ip, port) held by a server.
    AllocationId
);
id_type!(
    /// A game server, as the panel knows it. A UUID, so it is also a valid wings server id.
    ServerId
);
id_type!(
    /// One durable job (`jobs`).
    JobId
);
id_type!(
    /// One backup of a server; also its id on the node (a UUID fits wings' backup ids).
    BackupId
);
