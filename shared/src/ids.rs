//! Newtype identifiers. Each is validated when it is made, so it is safe to use in paths,
//! container names and log fields.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A server's id, chosen by the panel (a UUID in practice).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a server id is 1-64 ASCII letters, digits, '-' or '_', starting with a letter or digit")]
pub struct InvalidServerId;

impl ServerId {
    pub fn new(s: impl Into<String>) -> Result<ServerId, InvalidServerId> {
        let s = s.into();
        let valid = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
        if valid {
            Ok(ServerId(s))
        } else {
            Err(InvalidServerId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first eight characters, as used in SFTP user names.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(8)]
    }
}

impl TryFrom<String> for ServerId {
    type Error = InvalidServerId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ServerId::new(s)
    }
}

impl From<ServerId> for String {
    fn from(id: ServerId) -> String {
        id.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_path_safe() {
        assert!(ServerId::new("0b4c8a0e-7c1d-4f53-9a51-6c2f5d8e9f10").is_ok());
        for bad in ["", "../x", "a/b", "-a", "a b", "é", &"a".repeat(65)] {
            assert!(ServerId::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ServerId::new("0b4c8a0e-7c1d").unwrap().short(), "0b4c8a0e");
    }
}
