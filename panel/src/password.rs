//! argon2id password hashing with the configured cost.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

#[derive(Clone, Debug)]
pub struct PasswordHasherConfig {
    params: Params,
}

impl PasswordHasherConfig {
    pub fn new(auth: &AuthConfig) -> Result<PasswordHasherConfig, HashError> {
        let params = Params::new(auth.argon2_memory_kib, auth.argon2_iterations, 1, None)
            .map_err(|e| HashError(e.to_string()))?;
        Ok(PasswordHasherConfig { params })
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// Slow by design: call it on the blocking pool.
    pub fn hash(&self, password: &str) -> Result<String, HashError> {
        self.argon2()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| HashError(e.to_string()))
    }

    /// `false` for a wrong password and for a stored hash that cannot be read.
    pub fn verify(&self, password: &str, stored: &str) -> bool {
        let Ok(hash) = PasswordHash::new(stored) else {
            return false;
        };
        // The parameters stored with the hash are used, so raising the cost later still
        // verifies old hashes.
        self.argon2().verify_password(password.as_bytes(), &hash).is_ok()
    }

    /// A hash of nothing anyone knows, verified against when the account does not exist so
    /// that "no such user" takes as long as "wrong password".
    pub fn dummy_hash(&self) -> Result<String, HashError> {
        self.hash("mamba: no account has this password")
    }
}

/// Length rules only: composition rules push people to worse passwords (NIST SP 800-63B).
pub fn check_strength(password: &str) -> Result<(), &'static str> {
    let chars = password.chars().count();
    if chars < 10 {
        return Err("must be at least 10 characters");
    }
    if chars > 256 {
        return Err("must be at most 256 characters");
    }
    Ok(())
}
