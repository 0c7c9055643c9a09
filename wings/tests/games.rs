//! Real game servers in real containers: freeciv over TCP with its stdin console, and
//! minetest on UDP.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Wings, blueprint, docker, free_port, unique_id};
use serde_json::json;

const GAME_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn freeciv_full_lifecycle_leaves_nothing_behind() {
    let wings = Wings::start().await;
    let id = unique_id("freeciv");
    let port = free_port();
    wings
        .create(
            &id,
            blueprint("blueprints/freeciv.yaml"),
            json!({"AI_PLAYERS": "2"}),
            port,
        )
        .await;

    // Installed, started, and marked running by the console regex.
    let server = wings.wait_state(&id, "running", GAME_TIMEOUT).await;
    assert_eq!(server["install"]["status"], "installed");
    let log = wings
        .http
        .get(wings.url(&format!("/api/servers/{id}/install-logs")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("freeciv install complete"), "{log}");
    let lines = wings.logs(&id).await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("Now accepting new client connections on port {port}"))),
        "{lines:?}"
    );
    let (ok, bound) = docker(&["port", &format!("mamba-{id}"), &format!("{port}/tcp")]);
    assert!(ok && bound.contains(&format!("127.0.0.1:{port}")), "{bound}");

    // A console command's answer shows up in the logs, in order.
    let (status, _) = wings
        .post(
            &format!("/api/servers/{id}/commands"),
            json!({"commands": ["set timeout 42", "show timeout"]}),
        )
        .await;
    assert_eq!(status, 204);
    let lines = wings
        .wait_log(&id, "+  42 (-1, 8639999)", Duration::from_secs(20))
        .await;
    let set = lines
        .iter()
        .position(|l| l.contains("'timeout' has been set to 42"))
        .expect("set answer");
    let shown = lines
        .iter()
        .position(|l| l.contains("+  42 (-1, 8639999)"))
        .expect("show answer");
    assert!(set < shown, "answers arrive in the order the commands were sent");

    // Stop goes through the blueprint's stop command ("quit"), so freeciv says goodbye.
    assert_eq!(wings.power(&id, "stop").await.0, 202);
    wings.wait_state(&id, "offline", Duration::from_secs(60)).await;
    assert!(
        wings.logs(&id).await.iter().any(|l| l == "Goodbye."),
        "stopped by its own quit command"
    );
    let (ok, running) = docker(&["inspect", "-f", "{{.State.Running}}", &format!("mamba-{id}")]);
    assert!(ok && running == "false");

    // Start, restart, kill.
    assert_eq!(wings.power(&id, "start").await.0, 202);
    let first = wings.wait_state(&id, "running", GAME_TIMEOUT).await["container_id"].clone();
    assert_eq!(wings.power(&id, "restart").await.0, 202);
    let second = common::wait_for("a new container after restart", GAME_TIMEOUT, || {
        let wings = &wings;
        let id = &id;
        let first = first.clone();
        async move {
            let s = wings.server(id).await;
            (s["state"] == "running" && s["container_id"] != first).then_some(s)
        }
    })
    .await;
    assert_ne!(second["crash"]["attempts"], 1, "a restart is not a crash");
    assert_eq!(wings.power(&id, "kill").await.0, 202);
    let killed = wings.wait_state(&id, "offline", Duration::from_secs(30)).await;
    assert_eq!(killed["crash"]["attempts"], 0, "a kill is not a crash");

    // Delete: no container, no files, no endpoint left on the node network.
    let (status, _) = wings.delete(&format!("/api/servers/{id}")).await;
    assert_eq!(status, 204);
    assert_eq!(wings.get(&format!("/api/servers/{id}")).await.0, 404);
    assert!(
        wings.containers().is_empty(),
        "containers left: {:?}",
        wings.containers()
    );
    assert!(!wings.data_dir().join("volumes").join(&id).exists());
    assert!(!wings.data_dir().join("servers").join(&id).exists());
    let (_, endpoints) = docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .Containers}}{{.Name}} {{end}}",
        "mamba0",
    ]);
    assert!(!endpoints.contains(&id), "{endpoints}");
}

#[tokio::test(flavor = "multi_thread")]
async fn minetest_binds_its_udp_port_and_applies_config_edits() {
    let wings = Wings::start().await;
    let id = unique_id("minetest");
    let port = free_port();
    wings
        .create(
            &id,
            blueprint("blueprints/minetest.yaml"),
            json!({"SERVER_NAME": "Mamba test world"}),
            port,
        )
        .await;
    wings.wait_state(&id, "running", GAME_TIMEOUT).await;

    // The UDP port is published on the allocated address, and only for UDP.
    let (ok, bound) = docker(&["port", &format!("mamba-{id}")]);
    assert!(ok, "{bound}");
    assert!(
        bound.contains(&format!("{port}/udp -> 127.0.0.1:{port}")),
        "{bound}"
    );
    assert!(!bound.contains(&format!("{port}/tcp")), "{bound}");
    assert!(
        UdpSocket::bind(("127.0.0.1", port)).is_err(),
        "the host port is taken by the server"
    );

    // The blueprint's config-file edit rendered the variables into minetest.conf.
    let conf =
        std::fs::read_to_string(wings.data_dir().join("volumes").join(&id).join("minetest.conf")).unwrap();
    assert!(conf.contains("server_name=Mamba test world"), "{conf}");
    assert!(conf.contains(&format!("port={port}")), "{conf}");

    // Stop by its signal (SIGINT): minetest shuts down cleanly.
    assert_eq!(wings.power(&id, "stop").await.0, 202);
    wings.wait_state(&id, "offline", Duration::from_secs(60)).await;
    assert_eq!(wings.delete(&format!("/api/servers/{id}")).await.0, 204);
    assert!(wings.containers().is_empty());
}
