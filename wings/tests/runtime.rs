//! The wings runtime on the small test image: crash guard, recovery after `kill -9`, power
//! queue, limits and hardening. Real Docker, real containers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::time::Duration;

use common::{Wings, docker, free_port, testbox, unique_id, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

async fn running_testbox(wings: &Wings, variables: Value) -> String {
    let id = unique_id("box");
    wings.create(&id, testbox(), variables, free_port()).await;
    wings.wait_state(&id, "running", T).await;
    id
}

fn daemon_lines(lines: &[String], needle: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("[Mamba Daemon]: ") && l.contains(needle))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_guard_restarts_with_growing_delays_then_gives_up() {
    let wings = Wings::start_with(
        "[crash_guard]\nmax_attempts = 2\nwindow_secs = 600\ninitial_backoff_ms = 300\nmax_backoff_ms = 5000\n",
    )
    .await;
    let id = unique_id("crashy");
    wings
        .create(
            &id,
            testbox(),
            json!({"FAKE_EXIT_AFTER": "1", "FAKE_EXIT_CODE": "7"}),
            free_port(),
        )
        .await;
    let crashed = wings.wait_state(&id, "crashed", T).await;
    assert_eq!(crashed["crash"]["attempts"], 3);
    assert_eq!(crashed["crash"]["last_exit"]["exit_code"], 7);
    assert_eq!(crashed["crash"]["last_exit"]["oom_killed"], false);
    let lines = wings.logs(&id).await;
    let restarts = daemon_lines(&lines, "Restarting in");
    assert_eq!(restarts.len(), 2, "{lines:#?}");
    assert!(restarts[0].contains("Restarting in 300 ms"), "{restarts:?}");
    assert!(
        restarts[1].contains("Restarting in 600 ms"),
        "the delay grows: {restarts:?}"
    );
    assert_eq!(daemon_lines(&lines, "giving up").len(), 1, "{lines:#?}");
    // It stays down: no restart is scheduled after giving up.
    let (ok, running) = docker(&["inspect", "-f", "{{.State.Running}}", &format!("mamba-{id}")]);
    assert!(ok && running == "false");
    assert!(crashed["crash"].get("next_restart_at_ms").is_none());

    // A deliberate start clears the crash count.
    assert_eq!(wings.power(&id, "start").await.0, 202);
    let server = wings.wait_state(&id, "running", T).await;
    assert_eq!(server["crash"]["attempts"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn explicit_stops_and_typed_stop_commands_are_not_crashes() {
    let wings = Wings::start().await;
    let id = running_testbox(&wings, json!({})).await;
    assert_eq!(wings.power(&id, "stop").await.0, 202);
    let server = wings.wait_state(&id, "offline", T).await;
    assert_eq!(server["crash"]["attempts"], 0);
    assert!(
        wings.logs(&id).await.iter().any(|l| l == "fake-game: stopping"),
        "stopped through its stop command"
    );

    assert_eq!(wings.power(&id, "start").await.0, 202);
    wings.wait_state(&id, "running", T).await;
    wings.command(&id, "stop").await;
    let server = wings.wait_state(&id, "offline", T).await;
    assert_eq!(server["crash"]["attempts"], 0);
    assert!(daemon_lines(&wings.logs(&id).await, "unexpectedly").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn power_actions_queue_in_order_and_kill_always_goes_through() {
    let mut blueprint = testbox();
    // A game that ignores its stop command: only the timeout and kill can end it.
    blueprint["stop"] = json!({"command": "ignore", "timeout_secs": 600});
    let wings = Wings::start().await;
    let id = unique_id("stubborn");
    wings.create(&id, blueprint, json!({}), free_port()).await;
    wings.wait_state(&id, "running", T).await;

    assert_eq!(
        wings.power(&id, "stop").await,
        (202, json!({"action": "stop", "queued_behind": 0}))
    );
    wings.wait_state(&id, "stopping", T).await;
    let (status, body) = wings.power(&id, "start").await;
    assert_eq!(
        (status, body["queued_behind"].clone()),
        (202, json!(1)),
        "queued behind the stop"
    );
    // The stop would wait 600 s; kill ends it now. Then the queued start and kill run in order.
    let (status, body) = wings.power(&id, "kill").await;
    assert_eq!((status, body["queued_behind"].clone()), (202, json!(2)));
    let server = wait_for("the queue to drain", Duration::from_secs(45), || async {
        let s = wings.server(&id).await;
        (s["queued_actions"] == 0 && s["state"] == "offline").then_some(s)
    })
    .await;
    assert_eq!(server["crash"]["attempts"], 0);
    let lines = wings.logs(&id).await;
    assert_eq!(
        daemon_lines(&lines, "Starting server").len(),
        2,
        "the queued start ran after the stop: {lines:#?}"
    );
    assert_eq!(
        daemon_lines(&lines, "Killing server").len(),
        1,
        "then the queued kill: {lines:#?}"
    );

    // Many actions in a row on a well-behaved game: none is dropped, and the last one decides.
    let id = running_testbox(&wings, json!({})).await;
    for action in ["stop", "start", "restart", "stop", "start"] {
        assert_eq!(wings.power(&id, action).await.0, 202);
    }
    let server = wait_for("the queue to drain", T, || async {
        let s = wings.server(&id).await;
        (s["queued_actions"] == 0 && s["state"] == "running").then_some(s)
    })
    .await;
    assert!(server["last_error"].is_null(), "{server}");
    let lines = wings.logs(&id).await;
    assert_eq!(daemon_lines(&lines, "Server stopped").len(), 3, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_survive_wings_kill9_and_are_reattached() {
    let mut wings = Wings::start().await;
    let a = running_testbox(&wings, json!({})).await;
    let b = running_testbox(&wings, json!({})).await;
    let before_a = wings.server(&a).await["container_id"].clone();
    let before_b = wings.server(&b).await["container_id"].clone();
    wings.command(&a, "say before the crash").await;
    wings.wait_log(&a, "[say] before the crash", T).await;

    wings.kill9();
    for id in [&a, &b] {
        let (ok, running) = docker(&["inspect", "-f", "{{.State.Running}}", &format!("mamba-{id}")]);
        assert!(ok && running == "true", "{id} keeps running without wings");
    }
    wings.restart().await;

    for (id, before) in [(&a, &before_a), (&b, &before_b)] {
        let server = wings.wait_state(id, "running", T).await;
        assert_eq!(
            &server["container_id"], before,
            "the same container was reattached, not restarted"
        );
    }
    // Scrollback survived, and the console and power actions work on reattached servers.
    assert!(wings.logs(&a).await.iter().any(|l| l == "[say] before the crash"));
    wings.command(&a, "say after the crash").await;
    wings.wait_log(&a, "[say] after the crash", T).await;
    assert_eq!(wings.power(&b, "restart").await.0, 202);
    wait_for("b to restart in a new container", T, || {
        let (wings, b, before_b) = (&wings, &b, &before_b);
        async move {
            let s = wings.server(b).await;
            (s["state"] == "running" && &s["container_id"] != before_b).then_some(())
        }
    })
    .await;
    assert_eq!(wings.power(&a, "stop").await.0, 202);
    wings.wait_state(&a, "offline", T).await;
    let (_, started) = docker(&["inspect", "-f", "{{.RestartCount}}", &format!("mamba-{a}")]);
    assert_eq!(started, "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_reconciles_drift_and_cleans_leftover_install_containers() {
    let mut wings = Wings::start().await;
    let up = running_testbox(&wings, json!({})).await;
    let mut slow = testbox();
    slow["install"]["script"] = json!("echo installing slowly\nsleep 600\n");
    let installing = unique_id("installing");
    wings.create(&installing, slow, json!({}), free_port()).await;
    wings.wait_state(&installing, "installing", T).await;
    wait_for("the install container", T, || async {
        docker(&["inspect", &format!("mamba-install-{installing}")])
            .0
            .then_some(())
    })
    .await;

    let dead = docker(&["inspect", "-f", "{{.Id}}", &format!("mamba-{up}")]).1;
    wings.kill9();
    // Drift while wings is down: the running server's container dies.
    docker(&["kill", &format!("mamba-{up}")]);
    wings.restart().await;

    // The drifted server is brought back to its desired state (running), in a new container ...
    wait_for("the drifted server to run again", T, || async {
        let s = wings.server(&up).await;
        let (_, running) = docker(&["inspect", "-f", "{{.State.Running}}", &format!("mamba-{up}")]);
        (s["state"] == "running" && running == "true" && s["container_id"] != dead.as_str()).then_some(())
    })
    .await;
    // ... and the interrupted install is cleaned up and reported, not left hanging.
    let server = wings.wait_state(&installing, "offline", T).await;
    assert_eq!(server["install"]["status"], "failed");
    assert!(
        !docker(&["inspect", &format!("mamba-install-{installing}")]).0,
        "leftover install container removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_wings_but_leaves_servers_running() {
    let mut wings = Wings::start().await;
    let id = running_testbox(&wings, json!({})).await;
    let status = wings.terminate();
    assert!(status.success(), "wings exits cleanly on SIGTERM: {status:?}");
    let (ok, running) = docker(&["inspect", "-f", "{{.State.Running}}", &format!("mamba-{id}")]);
    assert!(ok && running == "true");
    wings.restart().await;
    wings.wait_state(&id, "running", T).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_is_oom_killed_and_reported() {
    let wings = Wings::start_with("[crash_guard]\nenabled = false\n").await;
    let id = unique_id("hog");
    let (status, body) = wings
        .post(
            "/api/servers",
            json!({
                "id": id, "blueprint": testbox(), "start_on_completion": true,
                "limits": {"memory_mb": 48, "cpu_percent": 100, "disk_mb": 100, "pids": 64},
                "allocations": {"default": {"ip": "127.0.0.1", "port": free_port()}},
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wings.wait_state(&id, "running", T).await;
    let container = wings.server(&id).await["container_id"]
        .as_str()
        .unwrap()
        .to_string();
    wings.command(&id, "hog 200").await;
    let server = wait_for("the OOM kill to be reported", T, || async {
        let s = wings.server(&id).await;
        (s["crash"]["last_exit"]["oom_killed"] == true).then_some(s)
    })
    .await;
    assert_eq!(server["state"], "offline");
    assert!(daemon_lines(&wings.logs(&id).await, "out of memory").len() == 1);
    // The fallback for an `OOMKilled: false` from inspect finds Docker's `oom` event.
    assert!(docker_client().await.oom_event_since(&container, 0).await);
}

async fn docker_client() -> mamba_wings::docker::DockerClient {
    let config = mamba_wings::config::Config::default();
    mamba_wings::docker::DockerClient::connect(&config.docker)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_from_outside_is_a_crash_but_not_out_of_memory() {
    let wings = Wings::start_with("[crash_guard]\nenabled = false\n").await;
    let id = running_testbox(&wings, json!({})).await;
    let container = wings.server(&id).await["container_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (killed, out) = docker(&["kill", "--signal", "KILL", &container]);
    assert!(killed, "{out}");
    let server = wait_for("the exit to be reported", T, || async {
        let s = wings.server(&id).await;
        (s["crash"]["last_exit"]["exit_code"] == 137).then_some(s)
    })
    .await;
    assert_eq!(server["crash"]["last_exit"]["oom_killed"], false);
    assert_eq!(server["state"], "offline");
    assert!(daemon_lines(&wings.logs(&id).await, "out of memory").is_empty());
    assert!(!docker_client().await.oom_event_since(&container, 0).await);
}

/// The container's pids cgroup, for cgroup v1 and v2 with either Docker cgroup driver.
fn pids_cgroup(container: &str) -> std::path::PathBuf {
    let candidates = [
        format!("/sys/fs/cgroup/pids/docker/{container}"),
        format!("/sys/fs/cgroup/pids/system.slice/docker-{container}.scope"),
        format!("/sys/fs/cgroup/docker/{container}"),
        format!("/sys/fs/cgroup/system.slice/docker-{container}.scope"),
    ];
    candidates
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.join("pids.max").exists())
        .unwrap_or_else(|| panic!("no pids cgroup found for {container} in {candidates:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_stays_inside_its_pids_limit() {
    let wings = Wings::start().await;
    let id = running_testbox(&wings, json!({})).await;
    let container = wings.server(&id).await["container_id"]
        .as_str()
        .unwrap()
        .to_string();
    wings.command(&id, "forkbomb").await;
    // The cgroup's pids controller records refused forks once the bomb hits the limit.
    let cgroup = pids_cgroup(&container);
    let events = cgroup.join("pids.events");
    let max = cgroup.join("pids.max");
    wait_for("forks to be refused by the pids limit", T, || async {
        let refused = std::fs::read_to_string(&events).ok()?;
        let n: u64 = refused.split_whitespace().nth(1)?.parse().ok()?;
        (n > 0).then_some(())
    })
    .await;
    assert_eq!(std::fs::read_to_string(&max).unwrap().trim(), "64");
    let current: u64 =
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/docker/{container}/pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert!(current <= 64, "{current} processes");
    // The node stays responsive: wings answers, and another server still works.
    let (status, _) = wings.get("/api/system").await;
    assert_eq!(status, 200);
    let other = running_testbox(&wings, json!({})).await;
    wings.command(&other, "say still fine").await;
    wings.wait_log(&other, "[say] still fine", T).await;
    assert_eq!(wings.power(&id, "kill").await.0, 202);
    wings.wait_state(&id, "offline", T).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tmp_is_a_small_tmpfs() {
    let wings = Wings::start_with("[docker]\ntmpfs_mb = 8\n").await;
    let id = running_testbox(&wings, json!({})).await;
    wings.command(&id, "fill-tmp 64").await;
    let lines = wings.wait_log(&id, "fake-game: fill-tmp done", T).await;
    assert!(
        lines.iter().any(|l| l.contains("No space left on device")),
        "{lines:#?}"
    );
    assert_eq!(wings.state(&id).await, "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn install_and_game_run_unprivileged_and_hardened() {
    let wings = Wings::start().await;
    let id = running_testbox(&wings, json!({"GREETING": "hi there"})).await;
    let root = wings.data_dir().join("volumes").join(&id);
    assert_eq!(
        std::fs::read_to_string(root.join("install-uid")).unwrap().trim(),
        "988"
    );
    let status = std::fs::read_to_string(root.join("install-status")).unwrap();
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // The config-file edit rendered the variable literally.
    let settings = std::fs::read_to_string(root.join("settings.properties")).unwrap();
    assert!(settings.contains("greeting=hi there"), "{settings}");

    let name = format!("mamba-{id}");
    let (_, inspect) = docker(&[
        "inspect",
        "-f",
        "{{.Config.User}} {{.HostConfig.Privileged}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}} {{.HostConfig.PidsLimit}} {{.HostConfig.Memory}}",
        &name,
    ]);
    assert_eq!(
        inspect,
        "988:988 false true [ALL] [no-new-privileges:true] 64 134217728"
    );
    let (ok, out) = docker(&[
        "exec",
        &name,
        "sh",
        "-c",
        "id -u; grep CapEff /proc/1/status; touch /etc/x 2>&1 || echo read-only",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("988") && out.contains("0000000000000000") && out.contains("read-only"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_cannot_reach_each_other() {
    let wings = Wings::start().await;
    let a = running_testbox(&wings, json!({})).await;
    let b = running_testbox(&wings, json!({})).await;
    wings.command(&a, "listen 7777").await;
    wings.wait_log(&a, "fake-game: listening on 7777", T).await;
    let (_, ip) = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &format!("mamba-{a}"),
    ]);
    assert!(!ip.is_empty());
    // The listener really is up: it answers from inside its own container.
    let (_, own) = docker(&[
        "exec",
        &format!("mamba-{a}"),
        "sh",
        "-c",
        "echo x | nc -w 2 127.0.0.1 7777",
    ]);
    assert!(own.contains("hello from"), "{own}");
    wings.command(&b, &format!("probe {ip} 7777")).await;
    let lines = wings.wait_log(&b, &format!("probe {ip}:7777"), T).await;
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("fake-game: probe {ip}:7777 failed")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_delete_keeps_the_server_so_it_can_be_retried() {
    let wings = Wings::start().await;
    let id = running_testbox(&wings, json!({})).await;
    // An immutable file makes removing the server folder fail.
    let pinned = wings.data_dir().join("volumes").join(&id).join("greeting.txt");
    let chattr = |flag: &str| {
        let status = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&pinned)
            .status()
            .unwrap();
        assert!(status.success(), "chattr {flag}");
    };
    chattr("+i");
    let (status, body) = wings.delete(&format!("/api/servers/{id}")).await;
    chattr("-i");
    assert_eq!(status, 500, "{body}");
    // Still listed, and the retry finishes the job.
    let (status, _) = wings.get(&format!("/api/servers/{id}")).await;
    assert_eq!(status, 200);
    let (status, body) = wings.delete(&format!("/api/servers/{id}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(!wings.data_dir().join("volumes").join(&id).exists());
    assert!(!wings.data_dir().join("servers").join(&id).exists());
    assert!(wings.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_crash_count_survives_a_wings_restart() {
    let mut wings = Wings::start_with(
        "[crash_guard]\nmax_attempts = 1\ninitial_backoff_ms = 60000\nmax_backoff_ms = 60000\n",
    )
    .await;
    let id = unique_id("crashy");
    wings
        .create(&id, testbox(), json!({"FAKE_EXIT_AFTER": "2"}), free_port())
        .await;
    // First crash: a restart is scheduled a minute later.
    wait_for("the first crash", T, || async {
        let server = wings.server(&id).await;
        (server["crash"]["attempts"] == 1).then_some(())
    })
    .await;
    // wings restarts meanwhile, starts the server at once, and the game crashes again: the
    // crash before the restart still counts, so the guard gives up.
    wings.kill9();
    wings.restart().await;
    let crashed = wings.wait_state(&id, "crashed", T).await;
    assert_eq!(crashed["crash"]["attempts"], 2, "{crashed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_update_is_checked_and_applies_at_the_next_start() {
    let wings = Wings::start().await;
    let port = free_port();
    let id = unique_id("upd");
    wings.create(&id, testbox(), json!({}), port).await;
    wings.wait_state(&id, "running", T).await;
    let spec = |id: &str, memory_mb: u64, port: u16| {
        json!({
            "id": id,
            "blueprint": testbox(),
            "limits": {"memory_mb": memory_mb, "cpu_percent": 50, "disk_mb": 64, "pids": 64},
            "allocations": {"default": {"ip": "127.0.0.1", "port": port}},
        })
    };

    // Bad updates change nothing.
    let before = wings.server(&id).await;
    let (status, body) = wings
        .put(&format!("/api/servers/{id}"), spec("other-id", 96, port))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("validation_failed")),
        "{body}"
    );
    let (status, body) = wings
        .put(&format!("/api/servers/{id}"), spec(&id, 96, port + 1))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("allocations"), "{body}");
    let (status, _) = wings
        .put("/api/servers/no-such-server", spec("no-such-server", 96, port))
        .await;
    assert_eq!(status, 404);
    assert_eq!(wings.server(&id).await["limits"], before["limits"]);

    // A good one: stored at once, and the container made at the next start carries it.
    let (status, body) = wings
        .put(&format!("/api/servers/{id}"), spec(&id, 96, port))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], true);
    assert_eq!(body["server"]["limits"]["memory_mb"], 96);
    let (status, _) = wings.power(&id, "restart").await;
    assert_eq!(status, 202);
    let memory = wait_for(
        "the restarted container to carry the new memory limit",
        T,
        || async {
            let container = wings.server(&id).await["container_id"]
                .as_str()
                .map(str::to_string)?;
            let (ok, out) = docker(&["inspect", "--format", "{{.HostConfig.Memory}}", &container]);
            (ok && out.trim() == (96u64 * 1024 * 1024).to_string()).then_some(out)
        },
    )
    .await;
    assert_eq!(memory.trim(), (96u64 * 1024 * 1024).to_string());
    wings.wait_state(&id, "running", T).await;

    // It survives a wings restart (the record was persisted).
    let mut wings = wings;
    wings.restart().await;
    assert_eq!(wings.server(&id).await["limits"]["memory_mb"], 96);
}
