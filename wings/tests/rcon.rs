//! The RCON console transport. The test game's RCON server is first checked against an
//! independent client (the Python `rcon` package); then wings drives it in a real container,
//! over HTTP and over the console socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::console::{ALL, auth, expect, script, send, token, tokens_config};
use common::{Wings, blueprint, free_port, unique_id, workspace_root};
use serde_json::json;

const GAME_TIMEOUT: Duration = Duration::from_secs(120);
const GAME_SCRIPT: &str = "docker/images/rconbox/files/usr/local/bin/rcon-game";

#[test]
fn the_test_rcon_server_agrees_with_an_independent_client() {
    let port = free_port();
    let mut game = Command::new("python3")
        .arg(workspace_root().join(GAME_SCRIPT))
        .env("RCON_HOST", "127.0.0.1")
        .env("RCON_PORT", port.to_string())
        .env("RCON_PASSWORD", "independent-check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once it says so; the line is printed after the socket listens.
    let mut lines = BufReader::new(game.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .take(20)
        .map(Result::unwrap)
        .any(|l| l.contains("RCON running"));
    assert!(ready, "the test game never opened RCON");
    let check = Command::new("python3")
        .arg(workspace_root().join("wings/tests/rcon_check.py"))
        .args(["127.0.0.1", &port.to_string(), "independent-check"])
        .output()
        .unwrap();
    game.kill().unwrap();
    game.wait().unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_travel_over_rcon() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = unique_id("rcon");
    wings
        .create(
            &id,
            blueprint("wings/tests/fixtures/rconbox.yaml"),
            json!({"RCON_DELAY_SECS": "4"}),
            free_port(),
        )
        .await;

    // Up, but RCON not open yet: a clear "try again" answer.
    wings.wait_log(&id, "starting RCON in", GAME_TIMEOUT).await;
    let (status, body) = wings
        .post(
            &format!("/api/servers/{id}/commands"),
            json!({"commands": ["list"]}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not accepting RCON"),
        "{body}"
    );

    wings.wait_state(&id, "running", GAME_TIMEOUT).await;
    wings.command(&id, "say hello over rcon").await;
    // The game's own log line, and the RCON answer, both reach the console.
    wings.wait_log(&id, "[chat] hello over rcon", GAME_TIMEOUT).await;
    let lines = wings.wait_log(&id, "said", GAME_TIMEOUT).await;
    assert!(lines.iter().any(|l| l == "said"), "{lines:?}");

    // A multi-packet answer (300 lines, over 6 KB) arrives whole and in order.
    wings.command(&id, "long 300").await;
    let lines = wings.wait_log(&id, "long answer line 00300", GAME_TIMEOUT).await;
    let numbers: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("long answer line"))
        .collect();
    assert_eq!(numbers.len(), 300);
    assert!(numbers.windows(2).all(|w| w[0] < w[1]));

    // The console socket sends commands the same way, in order.
    let steps = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        send("send command", json!(["echo first from the socket"])),
        send("send command", json!(["echo second from the socket"])),
        json!({"expect_sequence": [
            {"event": "console output", "arg": "first from the socket"},
            {"event": "console output", "arg": "second from the socket"},
        ]}),
    ];
    script(&wings, &id, steps, false).await;

    // Restart: the old connection is gone, a new one is made.
    let (status, _) = wings.power(&id, "restart").await;
    assert_eq!(status, 202);
    wings.wait_log(&id, "rcon command: stop", GAME_TIMEOUT).await;
    wings.wait_log(&id, "Server stopped", GAME_TIMEOUT).await;
    wings.wait_state(&id, "running", GAME_TIMEOUT).await;
    wings.command(&id, "echo after the restart").await;
    wings.wait_log(&id, "after the restart", GAME_TIMEOUT).await;

    // Stop goes over RCON too, and is a clean stop, not a crash.
    let (status, _) = wings.power(&id, "stop").await;
    assert_eq!(status, 202);
    let server = wings.wait_state(&id, "offline", GAME_TIMEOUT).await;
    assert_eq!(server["crash"]["attempts"], 0, "{server}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_rcon_password_is_a_clear_error() {
    let wings = Wings::start().await;
    let id = unique_id("rcon-pw");
    wings
        .create(
            &id,
            blueprint("wings/tests/fixtures/rconbox.yaml"),
            json!({"RCON_REAL_PASSWORD": "something-else"}),
            free_port(),
        )
        .await;
    wings.wait_state(&id, "running", GAME_TIMEOUT).await;
    let (status, body) = wings
        .post(
            &format!("/api/servers/{id}/commands"),
            json!({"commands": ["list"]}),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused the RCON password"),
        "{body}"
    );
    wings
        .wait_log(&id, "rcon: authentication failed", GAME_TIMEOUT)
        .await;
}
