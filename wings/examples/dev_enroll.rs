//! Enrolls a wings data folder with a throwaway CA, for benchmarks and local experiments
//! that run wings without a panel. Not part of the `wings` binary: build it with
//! `cargo build --release -p mamba-wings --example dev_enroll`.
//!
//! ```text
//! dev_enroll DATA_DIR CLIENT_DIR
//! ```
//!
//! Writes the node's identity into `DATA_DIR/pki/` exactly as `wings enroll` stores it, and
//! the panel's side into `CLIENT_DIR`: `ca.crt`, `panel.crt`, `panel.key` (a client
//! certificate with the panel's role), `token-signing.key` (the Ed25519 key whose public
//! half wings trusts for console and file tokens) and `node-id`. The CA's key is discarded,
//! so nothing else can ever be issued under it.
//!
//! Calling wings then needs the client certificate and the CA; the node's certificate names
//! it by a URI (`urn:mamba:node:<id>`), so clients verify the chain, not a host name.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use mamba_shared::node_api::CertificateResponse;
use mamba_shared::pki::{self, CertificateAuthority, Identity};
use mamba_wings::node_identity::{NodeIdentity, NodeRecord};
use ring::signature::KeyPair as _;

const VALIDITY: Duration = Duration::from_secs(30 * 86_400);

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(data_dir), Some(client_dir), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: dev_enroll DATA_DIR CLIENT_DIR");
    };
    let (data_dir, client_dir) = (PathBuf::from(data_dir), PathBuf::from(client_dir));
    let _ = rustls::crypto::ring::default_provider().install_default();

    let ca = CertificateAuthority::generate("mamba dev CA (throwaway)", VALIDITY)?;
    let node_id = format!("dev-{}", uuid::Uuid::new_v4().simple());
    let (key_pem, csr_pem) = pki::generate_key_and_csr()?;
    let cert = ca.sign_csr(&csr_pem, &Identity::node(&node_id)?, VALIDITY)?;

    // The token-signing key: Ed25519, public half as SubjectPublicKeyInfo.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("Ed25519 key generation failed"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("Ed25519 key unreadable"))?;
    // The fixed DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), then the raw key.
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());

    let issued = CertificateResponse {
        node_id: node_id.clone(),
        certificate_pem: cert.pem,
        ca_pem: ca.cert_pem().to_owned(),
        token_public_key_pem: pem("PUBLIC KEY", &spki),
        not_after: cert.info.not_after,
    };
    let record = NodeRecord {
        node_id: node_id.clone(),
        // No panel: renewal attempts fail and are retried, harmlessly, long after a bench.
        panel_url: "https://127.0.0.1:9/".into(),
    };
    NodeIdentity::install(&data_dir, record, &issued, &key_pem)
        .with_context(|| format!("installing the identity under {}", data_dir.display()))?;

    let panel = ca.issue(&Identity::Panel, VALIDITY)?;
    std::fs::create_dir_all(&client_dir).with_context(|| client_dir.display().to_string())?;
    let write = |name: &str, contents: &str| {
        let path = client_dir.join(name);
        std::fs::write(&path, contents).with_context(|| path.display().to_string())
    };
    write("ca.crt", ca.cert_pem())?;
    write("panel.crt", &panel.cert.pem)?;
    write("panel.key", &panel.key_pem)?;
    write("token-signing.key", &pem("PRIVATE KEY", pkcs8.as_ref()))?;
    write("node-id", &node_id)?;
    eprintln!(
        "enrolled {} as node {node_id} with a throwaway CA; the panel's client files are in {}",
        data_dir.display(),
        client_dir.display()
    );
    Ok(())
}
