//! The SFTP host key: an Ed25519 key in OpenSSH format, generated on first start.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::Context as _;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

/// Reads the key at `path`, or makes one there (mode 0600, folder 0700) when it is missing.
/// A key file that others can read is refused, as OpenSSH refuses one.
pub fn load_or_generate(path: &Path) -> anyhow::Result<PrivateKey> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "SFTP host key {} is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                );
            }
            PrivateKey::from_openssh(&bytes)
                .with_context(|| format!("SFTP host key {} is not an OpenSSH private key", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate(path),
        Err(e) => Err(e).with_context(|| format!("cannot read SFTP host key {}", path.display())),
    }
}

fn generate(path: &Path) -> anyhow::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| anyhow::anyhow!("no randomness for the SFTP host key"))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let pem = key.to_openssh(LineEnding::LF)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // create_new: two wings racing on one data folder must not overwrite each other's key.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create SFTP host key {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    tracing::info!(
        path = %path.display(),
        fingerprint = %key.public_key().fingerprint(Default::default()),
        "generated the SFTP host key"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sftp/host_ed25519");
        let first = load_or_generate(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = load_or_generate(&path).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_generate(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
    }
}
