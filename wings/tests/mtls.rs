//! An enrolled node's API: the panel's routes over mutual TLS admit only the panel's
//! certificate from the node's CA; the public listener (console sockets) refuses the panel's
//! routes, bearer token or not. The node's identity is made with a throwaway CA from
//! `mamba_shared::pki`, laid out as `wings enroll` stores it (SECURITY-CHECKLIST 25).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mamba_shared::pki::{self, CertSlot, CertificateAuthority, Identity};
use ring::signature::KeyPair as _;

const NODE: &str = "node-under-test";
const DAY: Duration = Duration::from_secs(86_400);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    child: Child,
    dir: tempfile::TempDir,
    api: u16,
    public: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- wings log ---\n{}",
                std::fs::read_to_string(self.dir.path().join("wings.log")).unwrap_or_default()
            );
        }
    }
}

/// Writes what `wings enroll` would have stored, signed by `ca`.
fn lay_out_identity(data_dir: &Path, ca: &CertificateAuthority) {
    let pki_dir = data_dir.join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let (key, csr) = pki::generate_key_and_csr().unwrap();
    let cert = ca.sign_csr(&csr, &Identity::node(NODE).unwrap(), DAY).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    let token_pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, spki)
    );
    std::fs::write(pki_dir.join("node.key"), key).unwrap();
    std::fs::write(pki_dir.join("node.crt"), cert.pem).unwrap();
    std::fs::write(pki_dir.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(pki_dir.join("panel-token.pub"), token_pem).unwrap();
    std::fs::write(
        pki_dir.join("node.json"),
        format!("{{\"node_id\": \"{NODE}\", \"panel_url\": \"https://127.0.0.1:9/\"}}"),
    )
    .unwrap();
}

async fn start(ca: &CertificateAuthority) -> Node {
    let dir = tempfile::Builder::new()
        .prefix("mamba-wings-mtls")
        .tempdir()
        .unwrap();
    let data_dir = dir.path().join("data");
    lay_out_identity(&data_dir, ca);
    let (api, public) = (free_port(), free_port());
    // The old bearer token is configured on purpose: an enrolled node must ignore it.
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:{api}\"\npublic_listen = \"127.0.0.1:{public}\"\n\
         token = \"test-token-0123456789abcdef0123456789\"\n\n[system]\ndata_dir = \"{}\"\n",
        data_dir.display()
    );
    std::fs::write(dir.path().join("wings.toml"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("wings.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_wings"))
        .arg("--config")
        .arg(dir.path().join("wings.toml"))
        .env("RUST_LOG", "info")
        .env("WINGS_SFTP__LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let node = Node {
        child,
        dir,
        api,
        public,
    };
    let plain = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = plain
            .get(format!("http://127.0.0.1:{public}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return node;
        }
        assert!(Instant::now() < deadline, "wings did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /api/system` on the mutual-TLS listener, as a client holding `slot` that expects
/// the node to be `expected`.
async fn system_status(node: &Node, ca_pem: &str, slot: Arc<CertSlot>, expected: &str) -> Option<u16> {
    let tls = pki::client_config(ca_pem, slot, Identity::node(expected).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    client
        .get(format!("https://127.0.0.1:{}/api/system", node.api))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

fn slot_for(ca: &CertificateAuthority, identity: &Identity) -> Arc<CertSlot> {
    let issued = ca.issue(identity, DAY).unwrap();
    CertSlot::new(&issued.cert.pem, &issued.key_pem).unwrap()
}

#[tokio::test]
async fn an_enrolled_node_admits_only_the_panel_over_mutual_tls() {
    // For the plain HTTP client below; the mutual-TLS clients name ring themselves.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
    let node = start(&ca).await;
    let ca_pem = ca.cert_pem().to_string();

    // The panel's certificate from the node's CA: admitted.
    let panel = slot_for(&ca, &Identity::Panel);
    assert_eq!(
        system_status(&node, &ca_pem, panel.clone(), NODE).await,
        Some(200)
    );

    // The panel expecting another node refuses this one's certificate.
    assert_eq!(system_status(&node, &ca_pem, panel, "another-node").await, None);

    // No certificate, another node's certificate (wrong role), a foreign CA's panel
    // certificate, an expired panel certificate: the handshake fails.
    assert_eq!(system_status(&node, &ca_pem, CertSlot::empty(), NODE).await, None);
    let other_node = slot_for(&ca, &Identity::node("other").unwrap());
    assert_eq!(system_status(&node, &ca_pem, other_node, NODE).await, None);
    let foreign = CertificateAuthority::generate("foreign", DAY).unwrap();
    assert_eq!(
        system_status(&node, &ca_pem, slot_for(&foreign, &Identity::Panel), NODE).await,
        None
    );
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_between(
            &Identity::Panel,
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    let expired = CertSlot::new(&expired.cert.pem, &expired.key_pem).unwrap();
    assert_eq!(system_status(&node, &ca_pem, expired, NODE).await, None);

    // The public listener refuses the panel's routes, with the old bearer token or without.
    let plain = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/api/system", node.public);
    let with_token = plain
        .get(&url)
        .bearer_auth("test-token-0123456789abcdef0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), 401);
    assert_eq!(plain.get(&url).send().await.unwrap().status(), 401);
    // Plain HTTP on the mutual-TLS listener gets nowhere.
    assert!(
        plain
            .get(format!("http://127.0.0.1:{}/api/system", node.api))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
    );
}
