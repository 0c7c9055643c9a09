//! This node's identity in the panel's PKI: its key, its certificate, the panel's CA and the
//! panel's token-signing key, kept under `<data_dir>/pki/`.
//!
//! `wings enroll` creates them once, trading a one-time token for a certificate. From then on
//! the node renews its certificate by itself (over mutual TLS, with a new key each time), well
//! before it expires, and swaps it into the live [`CertSlot`] so nothing restarts.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mamba_shared::node_api::{
    CertificateResponse, ENROLL_PATH, EnrollRequest, EnrollmentToken, RENEW_PATH, RenewRequest,
};
use mamba_shared::pki::{self, CertSlot, ClientPolicy, Identity, PkiError, Role};
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";
const TOKEN_KEY_FILE: &str = "panel-token.pub";
const RECORD_FILE: &str = "node.json";

/// How long one call to the panel may take.
const PANEL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Token(#[from] mamba_shared::node_api::InvalidEnrollmentToken),
    #[error("panel URL: {0}")]
    Url(String),
    #[error("panel request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the panel refused: {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the panel's answer does not match: {0}")]
    Mismatch(&'static str),
    #[error("{path}: {source}")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the node remembers about its enrollment, besides keys and certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub node_id: String,
    /// The panel's node listener, e.g. `https://panel.example:8443`.
    pub panel_url: String,
}

#[derive(Debug)]
pub struct NodeIdentity {
    dir: PathBuf,
    pub record: NodeRecord,
    pub ca_pem: String,
    /// The certificate this node presents, on its listener and to the panel.
    pub slot: Arc<CertSlot>,
}

/// The folder the PKI files live in.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Writes through a temporary file and a rename, so a crash never leaves half a key.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn panel_base(url: &str) -> Result<url::Url, IdentityError> {
    let parsed = url::Url::parse(url).map_err(|e| IdentityError::Url(e.to_string()))?;
    if parsed.scheme() != "https" {
        return Err(IdentityError::Url("the panel's node listener is https://".into()));
    }
    Ok(parsed)
}

fn join(base: &url::Url, path: &str) -> Result<url::Url, IdentityError> {
    base.join(path).map_err(|e| IdentityError::Url(e.to_string()))
}

async fn read_answer(response: reqwest::Response) -> Result<CertificateResponse, IdentityError> {
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(IdentityError::Refused {
            status: status.as_u16(),
            body: body.chars().take(500).collect(),
        });
    }
    Ok(response.json().await?)
}

fn client_with(tls: rustls::ClientConfig) -> Result<reqwest::Client, IdentityError> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(PANEL_TIMEOUT)
        .https_only(true)
        .build()?)
}

impl NodeIdentity {
    /// Enrolls this node with the panel at `panel_url`, using `token` once, and stores the
    /// result under `<data_dir>/pki/`. The panel is trusted only if its chain holds the CA
    /// whose fingerprint the token names.
    pub async fn enroll(
        data_dir: &Path,
        panel_url: &str,
        token: &str,
    ) -> Result<NodeIdentity, IdentityError> {
        let token = EnrollmentToken::parse(token)?;
        let base = panel_base(panel_url)?;
        let (key_pem, csr_pem) = pki::generate_key_and_csr()?;
        let client = client_with(pki::enrollment_client_config(&token.ca_fingerprint)?)?;
        let response = client
            .post(join(&base, ENROLL_PATH)?)
            .json(&EnrollRequest {
                token: token.secret.clone(),
                csr_pem,
            })
            .send()
            .await?;
        let answer = read_answer(response).await?;
        let ca = pki::certs_from_pem(&answer.ca_pem)?;
        if pki::fingerprint(&ca[0]) != token.ca_fingerprint {
            return Err(IdentityError::Mismatch("the CA is not the one the token names"));
        }
        let record = NodeRecord {
            node_id: answer.node_id.clone(),
            panel_url: base.to_string(),
        };
        let identity = NodeIdentity::store(data_dir, record, &answer, &key_pem)?;
        tracing::info!(node = %identity.record.node_id, "enrolled with the panel");
        Ok(identity)
    }

    /// Stores an identity issued out of band, exactly as [`NodeIdentity::enroll`] would:
    /// the certificate must name `record.node_id` and match `key_pem`. The binary never calls
    /// it; the test harness and the `dev_enroll` example (benchmarks) do, with a throwaway CA.
    pub fn install(
        data_dir: &Path,
        record: NodeRecord,
        issued: &CertificateResponse,
        key_pem: &str,
    ) -> Result<NodeIdentity, IdentityError> {
        NodeIdentity::store(data_dir, record, issued, key_pem)
    }

    /// Checks a certificate the panel sent against what this node asked for, then writes it.
    fn store(
        data_dir: &Path,
        record: NodeRecord,
        answer: &CertificateResponse,
        key_pem: &str,
    ) -> Result<NodeIdentity, IdentityError> {
        let expected = Identity::node(&record.node_id)?;
        if answer.node_id != record.node_id {
            return Err(IdentityError::Mismatch("another node id"));
        }
        let cert = pki::certs_from_pem(&answer.certificate_pem)?;
        if pki::inspect(&cert[0])?.identity != expected {
            return Err(IdentityError::Mismatch("the certificate names another identity"));
        }
        // Proves the certificate is for our key before anything is written.
        let slot = CertSlot::new(&answer.certificate_pem, key_pem)?;
        let dir = pki_dir(data_dir);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_err(&dir))?;
        write_atomic(&dir.join(CA_FILE), answer.ca_pem.as_bytes(), 0o644)?;
        write_atomic(
            &dir.join(TOKEN_KEY_FILE),
            answer.token_public_key_pem.as_bytes(),
            0o644,
        )?;
        // Key before certificate: a crash in between leaves a key that still matches nothing
        // newer, and the old pair stays usable until the certificate lands.
        write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CERT_FILE), answer.certificate_pem.as_bytes(), 0o644)?;
        let json = serde_json::to_vec_pretty(&record).map_err(|source| IdentityError::Record {
            path: dir.join(RECORD_FILE),
            source,
        })?;
        write_atomic(&dir.join(RECORD_FILE), &json, 0o644)?;
        Ok(NodeIdentity {
            dir,
            record,
            ca_pem: answer.ca_pem.clone(),
            slot,
        })
    }

    /// The stored identity, or `None` when this node was never enrolled.
    pub fn load(data_dir: &Path) -> Result<Option<NodeIdentity>, IdentityError> {
        let dir = pki_dir(data_dir);
        let record_path = dir.join(RECORD_FILE);
        if !record_path.exists() {
            return Ok(None);
        }
        let record: NodeRecord =
            serde_json::from_str(&read(&record_path)?).map_err(|source| IdentityError::Record {
                path: record_path,
                source,
            })?;
        let slot = CertSlot::new(&read(&dir.join(CERT_FILE))?, &read(&dir.join(KEY_FILE))?)?;
        let ca_pem = read(&dir.join(CA_FILE))?;
        Ok(Some(NodeIdentity {
            dir,
            record,
            ca_pem,
            slot,
        }))
    }

    /// The panel's token-signing public key as stored at enrollment.
    pub fn token_key_file(&self) -> PathBuf {
        self.dir.join(TOKEN_KEY_FILE)
    }

    /// An HTTP client to the panel that presents this node's current certificate and accepts
    /// only the panel's.
    pub fn panel_client(&self) -> Result<reqwest::Client, IdentityError> {
        client_with(pki::client_config(
            &self.ca_pem,
            self.slot.clone(),
            Identity::Panel,
        )?)
    }

    /// A TLS server configuration for wings' API that admits only the panel.
    pub fn panel_only_server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        Ok(pki::server_config(
            &self.ca_pem,
            self.slot.clone(),
            ClientPolicy {
                role: Role::Panel,
                required: true,
                check: None,
            },
        )?)
    }

    /// When the current certificate should be renewed: two thirds into its lifetime.
    pub fn renew_at(&self) -> Option<i64> {
        let info = self.slot.info()?;
        Some(info.not_before + (info.not_after - info.not_before) * 2 / 3)
    }

    /// Asks the panel for a new certificate with a new key, authenticated by the current
    /// one, then stores it and presents it from the next handshake on.
    pub async fn renew(&self) -> Result<(), IdentityError> {
        let base = panel_base(&self.record.panel_url)?;
        let (key_pem, csr_pem) = pki::generate_key_and_csr()?;
        let response = self
            .panel_client()?
            .post(join(&base, RENEW_PATH)?)
            .json(&RenewRequest { csr_pem })
            .send()
            .await?;
        let answer = read_answer(response).await?;
        if pki::certs_from_pem(&answer.ca_pem)?[0] != pki::certs_from_pem(&self.ca_pem)?[0] {
            return Err(IdentityError::Mismatch("the panel's CA changed"));
        }
        let data_dir = self.dir.parent().unwrap_or(&self.dir).to_owned();
        let renewed = NodeIdentity::store(&data_dir, self.record.clone(), &answer, &key_pem)?;
        self.slot.replace(&answer.certificate_pem, &key_pem)?;
        tracing::info!(
            node = %self.record.node_id,
            not_after = answer.not_after,
            fingerprint = renewed.slot.info().map(|i| i.fingerprint).unwrap_or_default(),
            "certificate renewed"
        );
        Ok(())
    }

    /// Renews in the background whenever the certificate is two thirds through its life,
    /// retrying with backoff (up to an hour apart) while the panel cannot be reached.
    pub fn spawn_renewal(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(10);
            loop {
                let due = self.renew_at().unwrap_or(0);
                let wait = u64::try_from(due - unix_now()).unwrap_or(0);
                if wait > 0 {
                    // Capped so a clock jump is noticed within the hour.
                    tokio::time::sleep(Duration::from_secs(wait.min(3600))).await;
                    continue;
                }
                match self.renew().await {
                    Ok(()) => backoff = Duration::from_secs(10),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_secs = backoff.as_secs(), "certificate renewal failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(3600));
                    }
                }
            }
        })
    }
}
