//! Node enrollment and mutual TLS, on both backends, with the panel's real node listener and
//! wings' real enrollment code: a token works once and only in time, and only against the
//! panel whose CA it pins; certificates renew; a revoked node's next request fails; a foreign
//! CA, an expired certificate, the wrong role, an unregistered certificate and no certificate
//! at all are refused; node A's certificate never passes for node B's; and the panel calling
//! a node refuses the same certificates from the node's side of the handshake
//! (SECURITY-CHECKLIST 25, 26 as far as routes exist, 27).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, HttpResponse, HttpServer, web};
use common::{TestDb, send};
use diesel::prelude::*;
use mamba_panel::http::{AppState, app};
use mamba_shared::node_api::{IDENTITY_PATH, RENEW_PATH, RenewRequest};
use mamba_shared::pki::{self, CertSlot, CertificateAuthority, Identity};
use mamba_wings::node_identity::{IdentityError, NodeIdentity};
use serde_json::json;

both_backends!(
    a_token_enrolls_once_in_time_and_only_against_its_ca,
    renewal_rotates_and_revocation_refuses_the_next_request,
    foreign_expired_wrong_role_unregistered_and_anonymous_are_refused,
    node_a_never_passes_for_node_b,
    the_panel_calls_a_node_only_on_its_live_certificate,
);

const IP: &str = "198.51.100.60";
const PASSWORD: &str = "node enrollment test passphrase";

/// A node row as an operator would have created it.
fn make_node(t: &TestDb, name: &str) -> String {
    use mamba_panel::db::schema::nodes;
    let id = uuid::Uuid::now_v7().to_string();
    let mut conn = t.db.get_blocking().unwrap();
    diesel::insert_into(nodes::table)
        .values((
            nodes::id.eq(&id),
            nodes::name.eq(name),
            nodes::fqdn.eq(format!("{name}.example.test")),
            nodes::location.eq("test"),
            nodes::cpu_percent.eq(400i64),
            nodes::memory_mb.eq(8192i64),
            nodes::disk_mb.eq(100_000i64),
            nodes::overallocation_percent.eq(0i64),
            nodes::is_public.eq(true),
            nodes::maintenance.eq(false),
            nodes::status.eq("active"),
            nodes::reservation_seq.eq(0i64),
            nodes::created_at.eq(0i64),
            nodes::updated_at.eq(0i64),
        ))
        .execute(&mut conn)
        .unwrap();
    id
}

fn make_user(t: &TestDb, state: &AppState, email: &str, super_admin: bool) {
    let hash = state.hasher.hash(PASSWORD).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: "Operator".into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: super_admin,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap();
}

/// A panel with its public API (as a test service) and its node listener on a real port.
struct Panel {
    state: web::Data<AppState>,
    url: String,
    _data: tempfile::TempDir,
}

impl Panel {
    fn start(t: &TestDb) -> Panel {
        let mut config = t.config();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        config.node_listener.public_url = url.clone();
        let state = t.state_with(config);
        let server = mamba_panel::http::node_pki::node_server(state.clone(), listener).unwrap();
        actix_web::rt::spawn(server);
        Panel {
            state,
            url,
            _data: tempfile::tempdir().unwrap(),
        }
    }

    fn data_dir(&self, name: &str) -> std::path::PathBuf {
        let dir = self._data.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An enrollment token for `node`, made by an operator through the API.
    async fn token(&self, node: &str) -> String {
        let svc = actix_web::test::init_service(app(self.state.clone(), common::metrics())).await;
        let login = send(
            &svc,
            common::post(
                "/api/v1/auth/login",
                json!({"email": "op@example.test", "password": PASSWORD, "client": "api"}),
                IP,
            )
            .to_request(),
        )
        .await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        let bearer = format!(
            "Bearer {}",
            login.body["tokens"]["access_token"].as_str().unwrap()
        );
        let a = send(
            &svc,
            actix_web::test::TestRequest::post()
                .uri(&format!("/api/v1/admin/nodes/{node}/enrollment-token"))
                .peer_addr(common::peer(IP))
                .insert_header(("authorization", bearer))
                .to_request(),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
        assert_eq!(a.body["panel_url"], self.url.as_str());
        let token = a.body["token"].as_str().unwrap().to_string();
        assert!(a.body["command"].as_str().unwrap().contains(&token));
        token
    }

    /// As the operator, through the API.
    async fn admin_post(&self, uri: &str, email: &str) -> common::Answer {
        let svc = actix_web::test::init_service(app(self.state.clone(), common::metrics())).await;
        let login = send(
            &svc,
            common::post(
                "/api/v1/auth/login",
                json!({"email": email, "password": PASSWORD, "client": "api"}),
                IP,
            )
            .to_request(),
        )
        .await;
        let bearer = format!(
            "Bearer {}",
            login.body["tokens"]["access_token"].as_str().unwrap()
        );
        send(
            &svc,
            actix_web::test::TestRequest::post()
                .uri(uri)
                .peer_addr(common::peer(IP))
                .insert_header(("authorization", bearer))
                .to_request(),
        )
        .await
    }

    fn ca_pem(&self) -> String {
        self.state.pki.ca.cert_pem().to_string()
    }
}

fn setup(t: &TestDb) -> Panel {
    let panel = Panel::start(t);
    make_user(t, &panel.state, "op@example.test", true);
    panel
}

/// What became of a request to the node listener.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Status(u16),
    /// The TLS handshake or connection failed.
    Refused,
}

/// Asks the node listener who it takes us for, over a new connection with `tls`.
async fn whoami(panel: &Panel, tls: rustls::ClientConfig) -> Outcome {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    outcome(client.get(format!("{}{IDENTITY_PATH}", panel.url)).send().await)
}

fn outcome(r: Result<reqwest::Response, reqwest::Error>) -> Outcome {
    match r {
        Ok(r) if r.status().is_success() => Outcome::Ok,
        Ok(r) => Outcome::Status(r.status().as_u16()),
        Err(_) => Outcome::Refused,
    }
}

/// A renewal request with `tls`.
async fn renew_with(panel: &Panel, tls: rustls::ClientConfig) -> Outcome {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let (_, csr_pem) = pki::generate_key_and_csr().unwrap();
    outcome(
        client
            .post(format!("{}{RENEW_PATH}", panel.url))
            .json(&RenewRequest { csr_pem })
            .send()
            .await,
    )
}

fn client_with(ca_pem: &str, slot: Arc<CertSlot>) -> rustls::ClientConfig {
    pki::client_config(ca_pem, slot, Identity::Panel).unwrap()
}

fn audit_count(t: &TestDb, action: &str) -> i64 {
    use mamba_panel::db::schema::audit_log;
    let mut conn = t.db.get_blocking().unwrap();
    audit_log::table
        .filter(audit_log::action.eq(action))
        .count()
        .get_result(&mut conn)
        .unwrap()
}

async fn a_token_enrolls_once_in_time_and_only_against_its_ca(t: TestDb) {
    let panel = setup(&t);
    let node = make_node(&t, "alpha");
    let token = panel.token(&node).await;

    // Not an operator: refused, and no token is made.
    make_user(&t, &panel.state, "user@example.test", false);
    let a = panel
        .admin_post(
            &format!("/api/v1/admin/nodes/{node}/enrollment-token"),
            "user@example.test",
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    // An unknown node.
    let a = panel
        .admin_post(
            &format!("/api/v1/admin/nodes/{}/enrollment-token", uuid::Uuid::now_v7()),
            "op@example.test",
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");

    // The same secret pinned to another CA: the node refuses the panel before sending it.
    let (secret, _) = token.rsplit_once('.').unwrap();
    let other_ca = CertificateAuthority::generate("impostor", Duration::from_secs(86_400)).unwrap();
    let wrong_pin = format!("{secret}.{}", other_ca.fingerprint());
    let dir = panel.data_dir("alpha");
    let err = NodeIdentity::enroll(&dir, &panel.url, &wrong_pin)
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Http(_)), "{err:?}");
    assert!(NodeIdentity::load(&dir).unwrap().is_none());

    // The real token: enrolled, files in place, the key private.
    let identity = NodeIdentity::enroll(&dir, &panel.url, &token).await.unwrap();
    assert_eq!(identity.record.node_id, node);
    let info = identity.slot.info().unwrap();
    assert_eq!(info.identity, Identity::Node(node.clone()));
    let key_mode = std::fs::metadata(dir.join("pki/node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let loaded = NodeIdentity::load(&dir).unwrap().unwrap();
    assert_eq!(loaded.slot.info().unwrap().fingerprint, info.fingerprint);
    assert_eq!(
        std::fs::read_to_string(loaded.token_key_file()).unwrap(),
        panel.state.pki.token_public_pem
    );
    assert_eq!(audit_count(&t, "node.enroll"), 1);
    assert_eq!(audit_count(&t, "node.enrollment_token.create"), 1);

    // Used once: refused the second time.
    let again = panel.data_dir("alpha-again");
    let err = NodeIdentity::enroll(&again, &panel.url, &token)
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::Refused { status: 401, .. }),
        "{err:?}"
    );

    // Expired: a fresh token whose 15 minutes are over.
    let late = panel.token(&node).await;
    {
        use mamba_panel::db::schema::node_enrollment_tokens;
        let mut conn = t.db.get_blocking().unwrap();
        diesel::update(node_enrollment_tokens::table.filter(node_enrollment_tokens::used_at.is_null()))
            .set(node_enrollment_tokens::expires_at.eq(mamba_panel::db::now_ms() - 1))
            .execute(&mut conn)
            .unwrap();
    }
    let err = NodeIdentity::enroll(&again, &panel.url, &late).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::Refused { status: 401, .. }),
        "{err:?}"
    );
    assert_eq!(audit_count(&t, "node.enroll"), 1);

    // The enrolled node's certificate works on the listener.
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), identity.slot.clone())).await,
        Outcome::Ok
    );
}

async fn renewal_rotates_and_revocation_refuses_the_next_request(t: TestDb) {
    let panel = setup(&t);
    let node = make_node(&t, "beta");
    let token = panel.token(&node).await;
    let dir = panel.data_dir("beta");
    let identity = NodeIdentity::enroll(&dir, &panel.url, &token).await.unwrap();
    let first = identity.slot.info().unwrap();
    // Renewal is due two thirds into the certificate's life, well before it ends.
    let due = identity.renew_at().unwrap();
    assert!(due > first.not_before && due < first.not_after);

    // The old certificate and key, kept aside.
    let old_slot = CertSlot::new(
        &std::fs::read_to_string(dir.join("pki/node.crt")).unwrap(),
        &std::fs::read_to_string(dir.join("pki/node.key")).unwrap(),
    )
    .unwrap();

    identity.renew().await.unwrap();
    let second = identity.slot.info().unwrap();
    assert_ne!(second.fingerprint, first.fingerprint);
    assert_eq!(second.identity, Identity::Node(node.clone()));
    // Stored, so a restart presents the renewed certificate.
    let loaded = NodeIdentity::load(&dir).unwrap().unwrap();
    assert_eq!(loaded.slot.info().unwrap().fingerprint, second.fingerprint);
    assert_eq!(audit_count(&t, "node.certificate.renew"), 1);

    // A superseded certificate cannot renew again (it stays valid only for a short grace).
    assert_eq!(
        renew_with(&panel, client_with(&panel.ca_pem(), old_slot.clone())).await,
        Outcome::Status(401)
    );

    // A client that has already talked to the panel, so its connection may be reused.
    let client = identity.panel_client().unwrap();
    let probe = || async { outcome(client.get(format!("{}{IDENTITY_PATH}", panel.url)).send().await) };
    assert_eq!(probe().await, Outcome::Ok);

    // Revoked by an operator: the next request fails, on a reused connection (401) or a new
    // handshake (refused).
    let a = panel
        .admin_post(&format!("/api/v1/admin/nodes/{node}/revoke"), "op@example.test")
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert!(a.body["certificates_revoked"].as_u64().unwrap() >= 1);
    assert_eq!(audit_count(&t, "node.revoke"), 1);
    let after = probe().await;
    assert!(
        matches!(after, Outcome::Status(401) | Outcome::Refused),
        "{after:?}"
    );
    // A fresh connection is refused in the handshake.
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), identity.slot.clone())).await,
        Outcome::Refused
    );
    assert!(identity.renew().await.is_err());

    // A new enrollment token re-admits the node.
    let token = panel.token(&node).await;
    let identity = NodeIdentity::enroll(&panel.data_dir("beta-again"), &panel.url, &token)
        .await
        .unwrap();
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), identity.slot.clone())).await,
        Outcome::Ok
    );
}

async fn foreign_expired_wrong_role_unregistered_and_anonymous_are_refused(t: TestDb) {
    let panel = setup(&t);
    let node = make_node(&t, "gamma");
    let token = panel.token(&node).await;
    let identity = NodeIdentity::enroll(&panel.data_dir("gamma"), &panel.url, &token)
        .await
        .unwrap();
    let ca = &panel.state.pki.ca;
    let day = Duration::from_secs(86_400);

    // Baseline: the enrolled node is admitted.
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), identity.slot.clone())).await,
        Outcome::Ok
    );

    // A certificate from a foreign CA, naming the same node.
    let foreign = CertificateAuthority::generate("foreign", day).unwrap();
    let f = foreign.issue(&Identity::node(&node).unwrap(), day).unwrap();
    let slot = CertSlot::new(&f.cert.pem, &f.key_pem).unwrap();
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), slot)).await,
        Outcome::Refused
    );

    // Our CA, but expired.
    let now = time::OffsetDateTime::now_utc();
    let old = ca
        .issue_between(
            &Identity::node(&node).unwrap(),
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    let slot = CertSlot::new(&old.cert.pem, &old.key_pem).unwrap();
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), slot)).await,
        Outcome::Refused
    );

    // Our CA, the panel's role: not a node.
    let p = ca.issue(&Identity::Panel, day).unwrap();
    let slot = CertSlot::new(&p.cert.pem, &p.key_pem).unwrap();
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), slot)).await,
        Outcome::Refused
    );

    // Our CA and the node's identity, but never issued through enrollment (unknown here).
    let stray = ca.issue(&Identity::node(&node).unwrap(), day).unwrap();
    let slot = CertSlot::new(&stray.cert.pem, &stray.key_pem).unwrap();
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), slot)).await,
        Outcome::Refused
    );

    // No certificate: the handshake is allowed (for enrollment), the route is not.
    assert_eq!(
        whoami(&panel, client_with(&panel.ca_pem(), CertSlot::empty())).await,
        Outcome::Status(401)
    );

    // The node side: a listener holding a foreign CA's panel certificate is refused by
    // wings before anything is sent.
    let fake_panel = foreign.issue(&Identity::Panel, day).unwrap();
    let fake_slot = CertSlot::new(
        &format!("{}{}", fake_panel.cert.pem, foreign.cert_pem()),
        &fake_panel.key_pem,
    )
    .unwrap();
    let (url, _server) = serve_hello(
        pki::server_config(
            foreign.cert_pem(),
            fake_slot,
            pki::ClientPolicy {
                role: pki::Role::Node,
                required: false,
                check: None,
            },
        )
        .unwrap(),
    );
    let client = identity.panel_client().unwrap();
    assert!(client.get(format!("{url}/hello")).send().await.is_err());
}

/// A minimal HTTPS server with the given TLS configuration, answering `GET /hello`.
fn serve_hello(tls: rustls::ServerConfig) -> (String, actix_web::dev::ServerHandle) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(|| {
        App::new().route(
            "/hello",
            web::get().to(|| async { HttpResponse::Ok().body("hi") }),
        )
    })
    .workers(1)
    .listen_rustls_0_23(listener, tls)
    .unwrap()
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (url, handle)
}

async fn node_a_never_passes_for_node_b(t: TestDb) {
    let panel = setup(&t);
    let a = make_node(&t, "node-a");
    let b = make_node(&t, "node-b");
    let token_a = panel.token(&a).await;
    let node_a = NodeIdentity::enroll(&panel.data_dir("a"), &panel.url, &token_a)
        .await
        .unwrap();
    // Node B's token cannot be redeemed for anything but node B, and A's certificate names A.
    let token_b = panel.token(&b).await;
    let node_b = NodeIdentity::enroll(&panel.data_dir("b"), &panel.url, &token_b)
        .await
        .unwrap();
    assert_eq!(node_a.slot.info().unwrap().identity, Identity::Node(a.clone()));
    assert_eq!(node_b.slot.info().unwrap().identity, Identity::Node(b.clone()));

    // Renewal by A yields A's identity, whatever A asks for.
    node_a.renew().await.unwrap();
    assert_eq!(node_a.slot.info().unwrap().identity, Identity::Node(a.clone()));

    // The panel calling node B refuses a listener that presents node A's certificate, and
    // accepts node B's own; wings' listener admits only the panel's role.
    let (url_a, _sa) = serve_hello(node_a.panel_only_server_config().unwrap());
    let (url_b, _sb) = serve_hello(node_b.panel_only_server_config().unwrap());
    let as_panel_to = |node: &str| {
        reqwest::Client::builder()
            .tls_backend_preconfigured(panel.state.pki.client_for_node(node).unwrap())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    assert!(
        as_panel_to(&b)
            .get(format!("{url_a}/hello"))
            .send()
            .await
            .is_err()
    );
    let ok = as_panel_to(&b)
        .get(format!("{url_b}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // Node A calling node B's API as if it were the panel: refused.
    let a_as_client = reqwest::Client::builder()
        .tls_backend_preconfigured(
            pki::client_config(&panel.ca_pem(), node_a.slot.clone(), Identity::node(&b).unwrap()).unwrap(),
        )
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    assert!(a_as_client.get(format!("{url_b}/hello")).send().await.is_err());
}

/// The other direction: the panel calling a node's API checks the node's certificate as
/// strictly as the node listener checks it, including revocation.
async fn the_panel_calls_a_node_only_on_its_live_certificate(t: TestDb) {
    let panel = setup(&t);
    let node = make_node(&t, "delta");
    let token = panel.token(&node).await;
    let identity = NodeIdentity::enroll(&panel.data_dir("delta"), &panel.url, &token)
        .await
        .unwrap();
    let ca = &panel.state.pki.ca;
    let day = Duration::from_secs(86_400);
    let as_panel = || {
        reqwest::Client::builder()
            .tls_backend_preconfigured(panel.state.pki.client_for_node(&node).unwrap())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    // A listener that presents `chain` + `key` for this node, admitting the panel.
    let listener = |chain: String, key: &str| {
        let slot = CertSlot::new(&chain, key).unwrap();
        let policy = pki::ClientPolicy {
            role: pki::Role::Panel,
            required: true,
            check: None,
        };
        serve_hello(pki::server_config(&panel.ca_pem(), slot, policy).unwrap())
    };
    let reaches = |url: String| {
        let client = as_panel();
        async move {
            client
                .get(format!("{url}/hello"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    };

    // Baseline: the enrolled node's own listener.
    let (url, _live) = serve_hello(identity.panel_only_server_config().unwrap());
    assert!(reaches(url.clone()).await);

    // The node's identity, but from a foreign CA.
    let foreign = CertificateAuthority::generate("foreign", day).unwrap();
    let f = foreign.issue(&Identity::node(&node).unwrap(), day).unwrap();
    let (furl, _f) = listener(format!("{}{}", f.cert.pem, foreign.cert_pem()), &f.key_pem);
    assert!(!reaches(furl).await);

    // Our CA and the node's identity, but expired.
    let now = time::OffsetDateTime::now_utc();
    let old = ca
        .issue_between(
            &Identity::node(&node).unwrap(),
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    let (ourl, _o) = listener(old.cert.pem.clone(), &old.key_pem);
    assert!(!reaches(ourl).await);

    // Our CA and the node's identity, never issued through enrollment.
    let stray = ca.issue(&Identity::node(&node).unwrap(), day).unwrap();
    let (surl, _s) = listener(stray.cert.pem.clone(), &stray.key_pem);
    assert!(!reaches(surl).await);

    // Our CA, the panel's role: not the node.
    let p = ca.issue(&Identity::Panel, day).unwrap();
    let (purl, _p) = listener(p.cert.pem.clone(), &p.key_pem);
    assert!(!reaches(purl).await);

    // Revoked by an operator: the node's own certificate no longer passes.
    let a = panel
        .admin_post(&format!("/api/v1/admin/nodes/{node}/revoke"), "op@example.test")
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert!(!reaches(url).await);
}
