//! Console-socket helpers: tokens signed like the panel signs them, and the Python
//! `websockets` client (tests/ws_client.py) run as a separate process.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::{Wings, workspace_root};

pub const ALL: &[&str] = &[
    "websocket.connect",
    "control.console",
    "control.start",
    "control.stop",
    "control.restart",
    "admin.websocket.install",
    "admin.websocket.errors",
];

pub fn fixture(name: &str) -> String {
    workspace_root()
        .join("wings/tests/fixtures/jwt")
        .join(name)
        .display()
        .to_string()
}

/// The `[tokens]` section that makes wings trust the test panel key.
pub fn tokens_config() -> String {
    format!(
        "[tokens]\npanel_public_key_file = \"{}\"\n",
        fixture("panel.pub.pem")
    )
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims of a valid ten-minute console token; tests change what they need.
pub fn claims(server: &str, user: &str, permissions: &[&str]) -> Value {
    let now = now();
    json!({
        "sub": user,
        "server": server,
        "permissions": permissions,
        "scope": "websocket",
        "iat": now,
        "exp": now + 600,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

pub fn sign_with(claims: &Value, key: &str) -> String {
    let pem = std::fs::read(fixture(key)).unwrap();
    let key = EncodingKey::from_ed_pem(&pem).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key).unwrap()
}

pub fn sign(claims: &Value) -> String {
    sign_with(claims, "panel.key.pem")
}

pub fn token(server: &str, permissions: &[&str]) -> String {
    sign(&claims(server, "user-1", permissions))
}

pub fn ws_url(wings: &Wings, server: &str) -> String {
    format!("ws://127.0.0.1:{}/api/servers/{server}/ws", wings.public_port)
}

/// How the Python client calls the panel's API: mutual TLS with the panel's certificate.
pub fn panel_http(wings: &Wings) -> Value {
    let (cert, key, ca) = wings.client_files();
    json!({"base": wings.url(""), "cert": cert, "key": key, "ca": ca})
}

pub fn auth(token: &str) -> Value {
    json!({"send": {"event": "auth", "args": [token]}})
}

pub fn send(event: &str, args: Value) -> Value {
    json!({"send": {"event": event, "args": args}})
}

pub fn expect(event: &str) -> Value {
    json!({"expect": {"event": event}})
}

pub fn expect_arg(event: &str, arg: Value) -> Value {
    json!({"expect": {"event": event, "arg": arg}})
}

pub fn expect_contains(event: &str, needle: &str) -> Value {
    json!({"expect": {"event": event, "contains": needle}})
}

/// Runs the Python client; answers (success, stdout and stderr).
pub async fn python(mode: &str, scenario: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scenario.json");
    std::fs::write(&path, serde_json::to_vec(scenario).unwrap()).unwrap();
    let output = tokio::process::Command::new("python3")
        .arg(workspace_root().join("wings/tests/ws_client.py"))
        .arg(mode)
        .arg(&path)
        .output()
        .await
        .expect("python3 with the websockets package (scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Runs `steps` on one socket to `server`; panics with the transcript when a step fails.
/// Returns the client's output (with `EVENT` lines when `dump`).
pub async fn script(wings: &Wings, server: &str, steps: Vec<Value>, dump: bool) -> String {
    let scenario = json!({
        "url": ws_url(wings, server),
        "http": panel_http(wings),
        "steps": steps,
        "dump": dump,
    });
    let (ok, output) = python("script", &scenario).await;
    assert!(ok, "console scenario failed:\n{output}");
    output
}

/// The events a dumped script received.
pub fn events(output: &str) -> Vec<Value> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("EVENT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
