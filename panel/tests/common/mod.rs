//! Test harness: every database test runs once on SQLite and once on PostgreSQL, each run in
//! a database of its own (a temporary SQLite file; a uniquely named PostgreSQL database
//! that is dropped afterwards).
//!
//! PostgreSQL comes from `MAMBA_TEST_POSTGRES_URL` (scripts/test.sh starts a cluster and
//! sets it). Without it the PostgreSQL half fails under CI (`CI=true`) and is skipped, loudly,
//! elsewhere.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod node;

use std::time::Duration;

use actix_web::web;
use diesel::{Connection, RunQueryDsl};
use mamba_panel::config::Config;
use mamba_panel::db::Db;
use mamba_panel::http::AppState;
use mamba_panel::keys::MasterKey;
use mamba_panel::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

pub struct TestDb {
    pub db: Db,
    pub url: String,
    pub kind: Kind,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// A fresh, migrated database, or `None` when PostgreSQL is not available outside CI.
    pub fn new(kind: Kind) -> Option<TestDb> {
        let (url, dir, postgres) = match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("panel.db").display());
                (url, Some(dir), None)
            }
            Kind::Postgres => {
                let admin = postgres_admin_url()?;
                let name = format!("mamba_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn =
                    diesel::PgConnection::establish(&admin).expect("connect to MAMBA_TEST_POSTGRES_URL");
                diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut conn)
                    .unwrap();
                let (base, _) = admin.rsplit_once('/').expect("the URL names a database");
                (format!("{base}/{name}"), None, Some((admin, name)))
            }
        };
        let db = Db::connect(&url, 4, Duration::from_secs(10)).unwrap();
        db.migrate_blocking().unwrap();
        Some(TestDb {
            db,
            url,
            kind,
            _dir: dir,
            postgres,
        })
    }

    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.database.url = self.url.clone();
        // The cheapest cost argon2id allows here: tests hash many passwords.
        config.auth.argon2_memory_kib = 8 * 1024;
        config.auth.argon2_iterations = 1;
        config
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state_with(self.config())
    }

    pub fn state_with(&self, config: Config) -> web::Data<AppState> {
        web::Data::new(AppState::new(config, self.db.clone(), &MasterKey::from_bytes([42; 32])).unwrap())
    }
}

impl TestDb {
    /// Drops the PostgreSQL database now, under its live pools.
    pub fn drop_database(&self) {
        if let Some((admin, name)) = &self.postgres {
            let mut conn = diesel::PgConnection::establish(admin).unwrap();
            diesel::sql_query(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .unwrap();
        }
    }
}

impl TestDb {
    /// Makes PostgreSQL close every connection to this test's database, as a server restart
    /// or failover would.
    pub fn terminate_connections(&self) {
        if let Some((admin, name)) = &self.postgres {
            let mut conn = diesel::PgConnection::establish(admin).unwrap();
            diesel::sql_query(format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ))
            .execute(&mut conn)
            .unwrap();
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.postgres {
            // FORCE closes the pool's connections, which are still open at this point.
            if let Ok(mut conn) = diesel::PgConnection::establish(admin) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn);
            }
        }
    }
}

fn postgres_admin_url() -> Option<String> {
    match std::env::var("MAMBA_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI")
                .map(|v| v == "true" || v == "1")
                .unwrap_or(false);
            assert!(
                !ci,
                "MAMBA_TEST_POSTGRES_URL is not set under CI: every database test must also run on PostgreSQL"
            );
            eprintln!(
                "\n!!! SKIPPING the PostgreSQL half of this test: MAMBA_TEST_POSTGRES_URL is not set.\n\
                 !!! Run `source scripts/panel-services.sh` (or scripts/test.sh) to start PostgreSQL.\n"
            );
            None
        }
    }
}

/// Records a heartbeat from `node` through the panel's own telemetry, as a running wings
/// would send it: placement takes only nodes that have been heard from.
pub fn heartbeat(db: &mamba_panel::db::Db, node: &mamba_panel::ids::NodeId) {
    let mut conn = db.get_blocking().unwrap();
    let hb = mamba_shared::node_api::Heartbeat {
        version: "test".into(),
        uptime_s: 1,
        resources: mamba_shared::node_api::NodeResources::default(),
        servers: Vec::new(),
    };
    mamba_panel::telemetry::record_heartbeat(
        &mut conn,
        node,
        &hb,
        &mamba_panel::request_meta::RequestMeta::system(),
        mamba_panel::db::now_ms(),
    )
    .unwrap();
}

pub fn metrics() -> web::Data<Metrics> {
    web::Data::new(Metrics::new().unwrap())
}

/// Declares `name::sqlite` and `name::postgres` tests that each call the async fn `name`
/// with a fresh [`TestDb`] of their backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[actix_web::test]
                async fn sqlite() {
                    let db = $crate::common::TestDb::new($crate::common::Kind::Sqlite).unwrap();
                    super::$name(db).await;
                }

                #[actix_web::test]
                async fn postgres() {
                    if let Some(db) = $crate::common::TestDb::new($crate::common::Kind::Postgres) {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}

/// Fails under CI, else skips loudly: for tools scripts/test.sh installs.
pub fn missing_tool(what: &str) {
    let ci = std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    assert!(
        !ci,
        "{what} is missing under CI; scripts/panel-services.sh installs it"
    );
    eprintln!("\n!!! SKIPPING: {what} is not available. Run `source scripts/panel-services.sh`.\n");
}

/// A real SMTP server (Python's aiosmtpd) writing what it receives into a Maildir.
pub struct SmtpSink {
    child: std::process::Child,
    pub port: u16,
    dir: tempfile::TempDir,
    seen: std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
}

impl SmtpSink {
    pub fn start() -> Option<SmtpSink> {
        let has_aiosmtpd = std::process::Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !has_aiosmtpd {
            missing_tool("python3 with aiosmtpd");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("maildir"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let sink = SmtpSink {
            child,
            port,
            dir,
            seen: Default::default(),
        };
        wait_until(
            Duration::from_secs(20),
            "the SMTP sink accepts connections",
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Some(sink)
    }

    /// Waits for a message to `to` that was not returned before; returns it raw.
    pub fn next_mail(&self, to: &str) -> String {
        let new = self.dir.path().join("maildir").join("new");
        let mut found = None;
        wait_until(Duration::from_secs(20), &format!("a new mail to {to}"), || {
            let Ok(entries) = std::fs::read_dir(&new) else {
                return false;
            };
            let mut seen = self.seen.lock().unwrap();
            for entry in entries.flatten() {
                let path = entry.path();
                if seen.contains(&path) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text.lines().any(|l| l.eq_ignore_ascii_case(&format!("to: {to}"))) {
                    seen.insert(path);
                    found = Some(text);
                    return true;
                }
            }
            false
        });
        found.unwrap()
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("maildir").join("new"))
            .map(|e| e.count())
            .unwrap_or(0)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds, failing the test after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Undoes quoted-printable (RFC 2045), which mailers use for long lines such as links.
pub fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `token=` value of the first link in a mail.
pub fn link_token(mail: &str) -> String {
    let mail = if mail
        .to_ascii_lowercase()
        .contains("content-transfer-encoding: quoted-printable")
    {
        decode_quoted_printable(mail)
    } else {
        mail.to_string()
    };
    let start = mail.find("token=").expect("the mail has a link") + "token=".len();
    mail[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect()
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: actix_web::http::StatusCode,
    pub headers: actix_web::http::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// `name=value` of a cookie the answer sets.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(actix_web::http::header::SET_COOKIE)
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with(&format!("{name}=")))
            .map(|c| c.split(';').next().unwrap_or_default().to_string())
    }
}

/// The app under test, as `actix_web::test::init_service` makes it.
pub trait TestApp<B>:
    actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse<B>,
        Error = actix_web::Error,
    >
{
}

impl<S, B> TestApp<B> for S where
    S: actix_web::dev::Service<
            actix_http::Request,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        >
{
}

pub async fn send<S, R, B>(svc: &S, req: R) -> Answer
where
    S: actix_web::dev::Service<R, Response = actix_web::dev::ServiceResponse<B>, Error = actix_web::Error>,
    B: actix_web::body::MessageBody,
{
    let res = actix_web::test::call_service(svc, req).await;
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = actix_web::test::read_body(res).await;
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Answer {
        status,
        headers,
        body,
    }
}

pub fn peer(ip: &str) -> std::net::SocketAddr {
    format!("{ip}:40000").parse().unwrap()
}

/// A JSON POST from `ip`.
pub fn post(uri: &str, body: serde_json::Value, ip: &str) -> actix_web::test::TestRequest {
    actix_web::test::TestRequest::post()
        .uri(uri)
        .peer_addr(peer(ip))
        .set_json(body)
}

pub fn get(uri: &str, ip: &str) -> actix_web::test::TestRequest {
    actix_web::test::TestRequest::get().uri(uri).peer_addr(peer(ip))
}

/// Makes a verified user (a super admin with `admin`) straight in the database, logs it in
/// over the API from `ip` and answers its bearer header.
pub async fn login_new_user<S, B>(
    svc: &S,
    t: &TestDb,
    email: &str,
    password: &str,
    admin: bool,
    ip: &str,
) -> String
where
    S: TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let hash = t.state().hasher.hash(password).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: "someone".into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: admin,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap();
    drop(conn);
    let login = post(
        "/api/v1/auth/login",
        serde_json::json!({"email": email, "password": password, "client": "api"}),
        ip,
    );
    let a = send(svc, login.to_request()).await;
    assert_eq!(a.status, actix_web::http::StatusCode::OK, "{a:?}");
    format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap())
}

/// `MAMBA_TEST_REDIS_URL`, or `None` (a failure under CI, a loud skip elsewhere).
pub fn redis_url() -> Option<String> {
    match std::env::var("MAMBA_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            missing_tool("MAMBA_TEST_REDIS_URL (a running redis-server)");
            None
        }
    }
}

impl TestDb {
    /// The state with its rate limits and events kept in Redis.
    pub async fn redis_state_with(&self, config: Config, redis_url: &str) -> web::Data<AppState> {
        let mut state = AppState::new(config, self.db.clone(), &MasterKey::from_bytes([42; 32])).unwrap();
        // A namespace per test database: its replicas share counters, other tests never do.
        let namespace = format!("mamba-test:{}", self.url);
        state.limiter = mamba_panel::ratelimit::Limiter::redis(redis_url, &namespace)
            .await
            .unwrap();
        state.events = mamba_panel::events::EventBus::redis(redis_url, &namespace)
            .await
            .unwrap();
        web::Data::new(state)
    }
}

/// A new user, logged in from `ip`, made a member of `tenant` with the built-in `role`;
/// answers its bearer.
pub async fn new_member<S, B>(
    svc: &S,
    t: &TestDb,
    (email, password, ip): (&str, &str, &str),
    tenant: &str,
    role: &str,
) -> String
where
    S: TestApp<B>,
    B: actix_web::body::MessageBody,
{
    use diesel::prelude::*;
    use mamba_panel::db::schema::users;
    let bearer = login_new_user(svc, t, email, password, false, ip).await;
    let user: String = users::table
        .filter(users::email.eq(email))
        .select(users::id)
        .first(&mut t.db.get_blocking().unwrap())
        .unwrap();
    add_membership(t, tenant, &user, role);
    bearer
}

/// Makes `user` a member of `tenant` with the built-in `role`, straight in the database.
pub fn add_membership(t: &TestDb, tenant: &str, user: &str, role: &str) {
    use diesel::prelude::*;
    use mamba_panel::db::schema::memberships;
    let mut conn = t.db.get_blocking().unwrap();
    diesel::insert_into(memberships::table)
        .values((
            memberships::id.eq(uuid::Uuid::now_v7().to_string()),
            memberships::tenant_id.eq(tenant),
            memberships::user_id.eq(user),
            memberships::role.eq(role),
            memberships::created_at.eq(0i64),
        ))
        .execute(&mut conn)
        .unwrap();
}

/// How many audit entries record `action` on `resource`.
pub fn audit_entries(t: &TestDb, action: &str, resource: &str) -> i64 {
    use diesel::prelude::*;
    use mamba_panel::db::schema::audit_log;
    let mut conn = t.db.get_blocking().unwrap();
    audit_log::table
        .filter(audit_log::action.eq(action))
        .filter(audit_log::resource_id.eq(resource))
        .count()
        .get_result(&mut conn)
        .unwrap()
}
