//! Console socket figures, each beside its baseline in the same run (docs/BENCHMARKS.md):
//!
//! 1. Lines per second from a flooding container to 1 and to 10 socket clients, against the
//!    rate at which `docker logs -f` reads the same lines of the same container.
//! 2. Latency from a line leaving the container to a client receiving it, p50 and p99, at
//!    1,000 lines/s; `docker logs -f` on the same lines alongside.
//! 3. Wings' resident memory with 100 connected idle clients across 10 servers.
//!
//! Run from the repository root, as root, with the images built:
//!     cargo bench -p mamba-wings --bench console
//! Prints a Markdown report on stdout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::console::{ALL, rss_kib, token, tokens_config, ws_url};
use common::{Wings, blueprint, free_port, testbox, unique_id};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const FLOOD_LINES: u64 = 300_000;
/// Paced runs last this long.
const PACED_SECONDS: u64 = 5;
/// The default `console.lines_per_second`.
const DEFAULT_GATE: f64 = 20_000.0;
const PACE_LINES: u64 = 5_000;
const PACE_RATE: u64 = 1_000;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// What one reader saw of the lines it was counting.
#[derive(Default)]
struct Seen {
    lines: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    dropped: AtomicU64,
}

impl Seen {
    fn line(&self) {
        let now = now_ns();
        let _ = self
            .first_ns
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        self.last_ns.store(now, Ordering::SeqCst);
        self.lines.fetch_add(1, Ordering::SeqCst);
    }

    fn rate(&self) -> f64 {
        let span = self
            .last_ns
            .load(Ordering::SeqCst)
            .saturating_sub(self.first_ns.load(Ordering::SeqCst));
        self.lines.load(Ordering::SeqCst) as f64 / (span.max(1) as f64 / 1e9)
    }
}

/// Connects and authenticates a socket client; `on_line` sees every console line.
async fn client(
    wings: &Wings,
    id: &str,
    on_line: impl Fn(&str) + Send + 'static,
    on_throttled: impl Fn(u64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(wings, id)).await.unwrap();
    let auth = json!({"event": "auth", "args": [token(id, ALL)]}).to_string();
    ws.send(Message::text(auth)).await.unwrap();
    loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("socket closed")
        };
        if text.contains("auth success") {
            break;
        }
    }
    tokio::spawn(async move {
        // Cheap matching, so the measuring client is not the bottleneck.
        const LINE: &str = r#"{"event":"console output","args":[""#;
        const THROTTLED: &str = r#"{"event":"throttled","args":["#;
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(text) = message else { continue };
            if let Some(rest) = text.strip_prefix(LINE) {
                on_line(rest.trim_end_matches("\"]}"));
            } else if let Some(rest) = text.strip_prefix(THROTTLED) {
                on_throttled(rest.trim_end_matches("]}").parse().unwrap_or(0));
            }
        }
    })
}

/// `docker logs -f` on the container, from now on; `on_line` sees every line.
fn docker_logs(id: &str, on_line: impl Fn(&str) + Send + 'static) -> std::process::Child {
    let mut child = Command::new("docker")
        .args(["logs", "-f", "--since", "0s", &format!("mamba-{id}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
        }
    });
    child
}

async fn wait_quiet(counters: &[&Seen], expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_total = u64::MAX;
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        let total: u64 = counters.iter().map(|c| c.lines.load(Ordering::SeqCst)).sum();
        if counters
            .iter()
            .all(|c| c.lines.load(Ordering::SeqCst) >= expected)
        {
            return;
        }
        if total != last_total {
            last_total = total;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_secs(3) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A source of console lines for the throughput runs.
struct Source {
    blueprint: Value,
    /// The command that makes the game print `lines` lines starting with `prefix`.
    command: String,
    prefix: &'static str,
    lines: u64,
}

impl Source {
    /// The test box printing as fast as it can.
    fn flood() -> Source {
        Source {
            blueprint: testbox(),
            command: format!("flood {FLOOD_LINES}"),
            prefix: "flood line",
            lines: FLOOD_LINES,
        }
    }

    /// The RCON test game printing at a steady `rate` lines/s.
    fn paced(rate: u64) -> Source {
        Source {
            blueprint: blueprint("wings/tests/fixtures/rconbox.yaml"),
            command: format!("pace {} {rate}", rate * PACED_SECONDS),
            prefix: "pace ",
            lines: rate * PACED_SECONDS,
        }
    }
}

async fn throughput(wings: &Wings, clients: usize, source: &Source) -> (f64, Vec<f64>, u64, u64) {
    let id = unique_id("bench-rate");
    wings
        .create(&id, source.blueprint.clone(), json!({}), free_port())
        .await;
    wings.wait_state(&id, "running", Duration::from_secs(60)).await;
    let prefix = source.prefix;
    let docker_seen = Arc::new(Seen::default());
    let d = docker_seen.clone();
    let mut logs = docker_logs(&id, move |l| {
        if l.starts_with(prefix) {
            d.line()
        }
    });
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let s = Arc::new(Seen::default());
        let (a, b) = (s.clone(), s.clone());
        let task = client(
            wings,
            &id,
            move |l| {
                if l.starts_with(prefix) {
                    a.line()
                }
            },
            move |n| {
                b.dropped.fetch_add(n, Ordering::SeqCst);
            },
        )
        .await;
        seen.push(s);
        tasks.push(task);
    }
    wings.command(&id, &source.command).await;
    let mut all: Vec<&Seen> = seen.iter().map(|s| &**s).collect();
    all.push(&docker_seen);
    wait_quiet(&all, source.lines).await;
    logs.kill().unwrap();
    let _ = logs.wait();
    for task in tasks {
        task.abort();
    }
    let delivered = seen
        .iter()
        .map(|s| s.lines.load(Ordering::SeqCst))
        .min()
        .unwrap_or(0);
    let dropped = seen
        .iter()
        .map(|s| s.dropped.load(Ordering::SeqCst))
        .max()
        .unwrap_or(0);
    let rates = seen.iter().map(|s| s.rate()).collect();
    wings.delete(&format!("/api/servers/{id}")).await;
    (docker_seen.rate(), rates, delivered, dropped)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

async fn latency(wings: &Wings) -> ((f64, f64, usize), (f64, f64, usize)) {
    let id = unique_id("bench-pace");
    wings
        .create(
            &id,
            blueprint("wings/tests/fixtures/rconbox.yaml"),
            json!({}),
            free_port(),
        )
        .await;
    wings.wait_state(&id, "running", Duration::from_secs(60)).await;
    let parse = |l: &str| -> Option<u64> {
        let rest = l.strip_prefix("pace ")?;
        rest.split_whitespace().nth(1)?.parse().ok()
    };
    let socket_delays = Arc::new(std::sync::Mutex::new(Vec::new()));
    let docker_delays = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = socket_delays.clone();
    let task = client(
        wings,
        &id,
        move |l| {
            if let Some(sent) = parse(l) {
                s.lock().unwrap().push(now_ns().saturating_sub(sent));
            }
        },
        |_| {},
    )
    .await;
    let d = docker_delays.clone();
    let mut logs = docker_logs(&id, move |l| {
        if let Some(sent) = parse(l) {
            d.lock().unwrap().push(now_ns().saturating_sub(sent));
        }
    });
    wings
        .command(&id, &format!("pace {PACE_LINES} {PACE_RATE}"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && (socket_delays.lock().unwrap().len() < PACE_LINES as usize
            || docker_delays.lock().unwrap().len() < PACE_LINES as usize)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    logs.kill().unwrap();
    let _ = logs.wait();
    task.abort();
    wings.delete(&format!("/api/servers/{id}")).await;
    let summary = |delays: &std::sync::Mutex<Vec<u64>>| {
        let mut d = delays.lock().unwrap().clone();
        d.sort_unstable();
        (percentile(&d, 0.5), percentile(&d, 0.99), d.len())
    };
    (summary(&socket_delays), summary(&docker_delays))
}

async fn idle_memory(wings: &Wings) -> (u64, u64) {
    let mut ids = Vec::new();
    for _ in 0..10 {
        let id = unique_id("bench-idle");
        wings.create(&id, testbox(), json!({}), free_port()).await;
        ids.push(id);
    }
    for id in &ids {
        wings.wait_state(id, "running", Duration::from_secs(120)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(wings.pid());
    let mut tasks = Vec::new();
    for id in &ids {
        for _ in 0..10 {
            tasks.push(client(wings, id, |_| {}, |_| {}).await);
        }
    }
    // Let stats samplers and history replays settle before reading memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let with_clients = rss_kib(wings.pid());
    for task in tasks {
        task.abort();
    }
    for id in &ids {
        wings.delete(&format!("/api/servers/{id}")).await;
    }
    (before, with_clients)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists targets; nothing to list here
    }
    let log_cap = "\n[docker]\nlog_max_mb = 200\n";
    let raised = Wings::start_with(&format!(
        "{}\n[console]\nlines_per_second = 10000000\n{log_cap}",
        tokens_config()
    ))
    .await;
    let wings = Wings::start_with(&format!("{}{log_cap}", tokens_config())).await;
    println!("## Console sockets (issue: live consoles and stats over WebSocket)\n");
    println!("Reproduce with `cargo bench -p mamba-wings --bench console` (as root, images built).");
    println!(
        "Up to the flood gate: the RCON test game prints time-stamped lines at a steady rate for {PACED_SECONDS} s; `docker logs -f` and the socket clients read the same lines in the same run. Rates are lines over the time from each reader's first line to its last.\n"
    );
    println!(
        "| Source rate | Clients | docker logs -f | Slowest client | Mean client | Ratio (slowest / docker) | Lines each client got | Reported dropped |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for rate in [5_000, 18_000] {
        for clients in [1, 10] {
            let (docker, rates, delivered, dropped) = throughput(&wings, clients, &Source::paced(rate)).await;
            let slowest = rates.iter().cloned().fold(f64::INFINITY, f64::min);
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            println!(
                "| {rate}/s | {clients} | {docker:.0}/s | {slowest:.0}/s | {mean:.0}/s | {:.2}× | {delivered} of {} | {dropped} |",
                slowest / docker,
                rate * PACED_SECONDS
            );
        }
    }
    println!(
        "\nBeyond the gate: a test-box container prints {FLOOD_LINES} lines as fast as it can (`yes | head`), which alone keeps one of the two cores busy. With the default gate clients should get about 20,000 lines/s; with the gate raised, the pipeline itself is measured.\n"
    );
    println!(
        "| Flood gate | Clients | docker logs -f | Slowest client | Mean client | Target rate min(docker, gate) | Ratio (slowest / target) | Lines each client got | Reported dropped |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (gate, instance) in [(None, &wings), (Some(10_000_000.0), &raised)] {
        for clients in [1, 10] {
            let (docker, rates, delivered, dropped) = throughput(instance, clients, &Source::flood()).await;
            let slowest = rates.iter().cloned().fold(f64::INFINITY, f64::min);
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            let gate_rate = gate.unwrap_or(DEFAULT_GATE);
            let target = docker.min(gate_rate);
            let gate_label = if gate.is_some() {
                "raised (10M/s)"
            } else {
                "default (20,000/s)"
            };
            println!(
                "| {gate_label} | {clients} | {docker:.0}/s | {slowest:.0}/s | {mean:.0}/s | {target:.0}/s | {:.2}× | {delivered} of {FLOOD_LINES} | {dropped} |",
                slowest / target
            );
        }
    }
    drop(raised);
    let ((p50, p99, n), (dp50, dp99, dn)) = latency(&wings).await;
    println!("\n| Latency at {PACE_RATE} lines/s | p50 | p99 | Lines |");
    println!("|---|---|---|---|");
    println!("| console socket client | {p50:.2} ms | {p99:.2} ms | {n} |");
    println!("| docker logs -f (baseline) | {dp50:.2} ms | {dp99:.2} ms | {dn} |");
    let (before, with_clients) = idle_memory(&wings).await;
    println!("\n| Wings RSS, 10 running servers | Value |");
    println!("|---|---|");
    println!("| no sockets | {:.1} MiB |", before as f64 / 1024.0);
    println!(
        "| 100 idle authenticated sockets (10 per server) | {:.1} MiB |",
        with_clients as f64 / 1024.0
    );
    println!(
        "| per socket | {:.1} KiB |",
        with_clients.saturating_sub(before) as f64 / 100.0
    );
}
