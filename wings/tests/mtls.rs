//! Mutual TLS in both directions, against a real wings enrolled with a throwaway CA from
//! `mamba_shared::pki` (laid out as `wings enroll` stores it), SECURITY-CHECKLIST 25:
//!
//! - the panel's API admits only the panel's certificate from the node's CA: no certificate,
//!   another CA's, an expired or not yet valid one, or another role's are refused in the
//!   handshake; the public listener refuses the panel's routes, bearer token
//!   or not; a wings that was never enrolled does not serve at all;
//! - wings calling the panel accepts only the panel's certificate from its CA, and presents
//!   its own node certificate.
//!
//! Revoking a panel certificate has no meaning on the node (ADR 0009: the panel's certificate
//! lives a week and is never stored); revocation of node certificates is the panel's side,
//! covered in panel/tests/node_enrollment.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use common::Wings;
use mamba_shared::pki::{self, CertSlot, CertificateAuthority, ClientPolicy, Identity, Role};
use mamba_wings::node_identity::NodeIdentity;

const DAY: Duration = Duration::from_secs(86_400);

fn slot(issued: &pki::IssuedKeyPair) -> Arc<CertSlot> {
    CertSlot::new(&issued.cert.pem, &issued.key_pem).unwrap()
}

/// `GET /api/system` on the mutual-TLS listener with `client`: the status, or `None` when the
/// connection failed (the handshake was refused).
async fn system_status(wings: &Wings, client: &reqwest::Client) -> Option<u16> {
    client
        .get(wings.url("/api/system"))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test]
async fn the_panel_api_admits_only_the_panel_certificate_from_the_node_ca() {
    let wings = Wings::start().await;
    let pki = &wings.pki;

    // The panel's certificate from the node's CA: admitted.
    assert_eq!(system_status(&wings, &wings.http).await, Some(200));

    // The panel expecting another node refuses this one's certificate.
    let panel = slot(&pki.panel);
    let expecting_another = pki.client_for(panel, "another-node");
    assert_eq!(system_status(&wings, &expecting_another).await, None);

    let now = time::OffsetDateTime::now_utc();
    let foreign = CertificateAuthority::generate("foreign", DAY).unwrap();
    let refused: Vec<(&str, Arc<CertSlot>)> = vec![
        ("no certificate", CertSlot::empty()),
        (
            "another node's certificate (node role)",
            slot(&pki.ca.issue(&Identity::node("other").unwrap(), DAY).unwrap()),
        ),
        (
            "this node's own certificate (node role)",
            slot(&pki.ca.issue(&Identity::node(&pki.node_id).unwrap(), DAY).unwrap()),
        ),
        (
            "a foreign CA's panel certificate",
            slot(&foreign.issue(&Identity::Panel, DAY).unwrap()),
        ),
        ("a foreign CA's panel certificate with its CA in the chain", {
            let f = foreign.issue(&Identity::Panel, DAY).unwrap();
            CertSlot::new(&format!("{}{}", f.cert.pem, foreign.cert_pem()), &f.key_pem).unwrap()
        }),
        (
            "an expired panel certificate",
            slot(
                &pki.ca
                    .issue_between(
                        &Identity::Panel,
                        now - time::Duration::days(3),
                        now - time::Duration::days(1),
                    )
                    .unwrap(),
            ),
        ),
        (
            "a panel certificate not valid yet",
            slot(
                &pki.ca
                    .issue_between(
                        &Identity::Panel,
                        now + time::Duration::days(1),
                        now + time::Duration::days(3),
                    )
                    .unwrap(),
            ),
        ),
    ];
    for (what, client_slot) in refused {
        let client = pki.client_with(client_slot);
        assert_eq!(system_status(&wings, &client).await, None, "{what} was admitted");
    }
    // The panel still gets in after all that.
    assert_eq!(system_status(&wings, &wings.http).await, Some(200));

    // The public listener refuses the panel's routes, with a bearer token or without.
    for path in ["/api/system", "/api/servers"] {
        let url = wings.public_url(path);
        let with_token = wings
            .public
            .get(&url)
            .bearer_auth("test-token-0123456789abcdef0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(with_token.status(), 401, "{path}");
        assert_eq!(wings.public.get(&url).send().await.unwrap().status(), 401);
    }
    // Plain HTTP on the mutual-TLS listener gets nowhere.
    let plain = wings
        .public
        .get(format!("http://127.0.0.1:{}/api/system", wings.port))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
}

/// A minimal HTTPS server with `tls`, answering `GET /hello` with the client's identity.
fn serve_hello(tls: rustls::ServerConfig) -> (String, actix_web::dev::ServerHandle) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(|| {
        App::new().route(
            "/hello",
            web::get().to(|req: HttpRequest| async move {
                let who = req.conn_data::<String>().cloned().unwrap_or_default();
                HttpResponse::Ok().body(who)
            }),
        )
    })
    .workers(1)
    .on_connect(|conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions| {
        type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
        if let Some(tls) = conn.downcast_ref::<Tls>()
            && let Some(info) = pki::peer_identity(tls.get_ref().1.peer_certificates())
        {
            ext.insert(info.identity.uri());
        }
    })
    .listen_rustls_0_23(listener, tls)
    .unwrap()
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (url, handle)
}

/// The other direction: the node's client to the panel (heartbeats, metrics, renewal) trusts
/// only the panel's certificate from the node's CA, and identifies itself as the node.
#[actix_web::test]
async fn wings_calls_only_the_panel_of_its_ca() {
    let wings = Wings::start().await;
    let pki = &wings.pki;
    let identity = NodeIdentity::load(&wings.data_dir()).unwrap().unwrap();
    let client = identity.panel_client().unwrap();
    // A listener presenting `server` that requires a node certificate from the node's CA.
    let listen_as = |server: Arc<CertSlot>| {
        let policy = ClientPolicy {
            role: Role::Node,
            required: true,
            check: None,
        };
        serve_hello(pki::server_config(pki.ca.cert_pem(), server, policy).unwrap())
    };

    // The panel, with a certificate from the node's CA: reached, and it sees the node.
    let (url, _panel) = listen_as(slot(&pki.ca.issue(&Identity::Panel, DAY).unwrap()));
    let r = client.get(format!("{url}/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        Identity::node(&pki.node_id).unwrap().uri()
    );

    let now = time::OffsetDateTime::now_utc();
    let foreign = CertificateAuthority::generate("foreign", DAY).unwrap();
    let f = foreign.issue(&Identity::Panel, DAY).unwrap();
    let impostors: Vec<(&str, Arc<CertSlot>)> = vec![
        (
            "a foreign CA's panel",
            CertSlot::new(&format!("{}{}", f.cert.pem, foreign.cert_pem()), &f.key_pem).unwrap(),
        ),
        (
            "an expired panel certificate",
            slot(
                &pki.ca
                    .issue_between(
                        &Identity::Panel,
                        now - time::Duration::days(3),
                        now - time::Duration::days(1),
                    )
                    .unwrap(),
            ),
        ),
        (
            "another node posing as the panel",
            slot(&pki.ca.issue(&Identity::node("other").unwrap(), DAY).unwrap()),
        ),
    ];
    for (what, server) in impostors {
        let (url, _server) = listen_as(server);
        assert!(
            client.get(format!("{url}/hello")).send().await.is_err(),
            "wings trusted {what}"
        );
    }
}

/// Without an identity there is nothing to serve: wings exits at once, saying what to do.
#[test]
fn an_unenrolled_wings_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wings.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:{}\"\npublic_listen = \"127.0.0.1:{}\"\n\
             token = \"test-token-0123456789abcdef0123456789\"\n\n[system]\ndata_dir = \"{}\"\n",
            common::free_port(),
            common::free_port(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wings"))
        .arg("--config")
        .arg(&config)
        .env("WINGS_SFTP__LISTEN", format!("127.0.0.1:{}", common::free_port()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not enrolled"), "{stderr}");
    assert!(stderr.contains("wings enroll"), "{stderr}");
}
