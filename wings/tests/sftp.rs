//! SFTP against real clients: Python paramiko (`sftp_client.py`), OpenSSH's `sftp -b` and
//! `sshfs`, plus a raw TCP client that sends garbage. Installed by `scripts/sftp-tools.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Wings, testbox, unique_id, wait_for};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Test users: the key pair and password hash are made once per test in its temp folder.
struct Users {
    key: PathBuf,
    public_key: String,
    bob_key: PathBuf,
    bob_public_key: String,
    hash: String,
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

fn hash_password(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wings"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

const PASSWORD: &str = "correct horse battery staple";

fn users(dir: &Path) -> Users {
    let (key, public_key) = keygen(dir, "alice_key");
    let (bob_key, bob_public_key) = keygen(dir, "bob_key");
    Users {
        key,
        public_key,
        bob_key,
        bob_public_key,
        hash: hash_password(PASSWORD),
    }
}

/// Writes the credential file: alice (password and key) and bob (password) on `server`, with
/// the given permissions each.
fn credentials(dir: &Path, users: &Users, server: &str, alice: &[&str], bob: &[&str]) -> PathBuf {
    let path = dir.join("sftp-credentials.toml");
    let list = |p: &[&str]| serde_json::to_string(p).unwrap();
    std::fs::write(
        &path,
        format!(
            "[[users]]\nname = \"alice\"\nid = \"u-alice\"\npassword_hash = \"{}\"\nauthorized_keys = [\"{}\"]\n\
             [users.servers]\n\"{server}\" = {}\n\n\
             [[users]]\nname = \"bob\"\nid = \"u-bob\"\npassword_hash = \"{}\"\nauthorized_keys = [\"{}\"]\n\
             [users.servers]\n\"{server}\" = {}\n",
            users.hash,
            users.public_key,
            list(alice),
            users.hash,
            users.bob_public_key,
            list(bob),
        ),
    )
    .unwrap();
    path
}

/// Starts wings with SFTP on, creates a server (without starting it) and returns its id.
async fn setup(extra: &str, alice: &[&str], bob: &[&str]) -> (Wings, Users, String, tempfile::TempDir) {
    setup_with(extra, alice, bob, None, &[]).await
}

/// As `setup`, with a disk quota of `disk_mb` for the server.
async fn setup_with(
    extra: &str,
    alice: &[&str],
    bob: &[&str],
    disk_mb: Option<u64>,
    denylist: &[&str],
) -> (Wings, Users, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let users = users(dir.path());
    let id = unique_id("sftp");
    let creds = credentials(dir.path(), &users, &id, alice, bob);
    // One start at a time: wings creates the shared Docker network when it is missing, and
    // two creating it at once would make two networks of the same name.
    static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let starting = STARTING.lock().await;
    // The harness enrolls wings, which would make the panel the auth source: these tests
    // are about the SFTP server itself, so the credential file decides.
    let wings = Wings::start_with(&format!(
        "[sftp]\nauth = \"file\"\ncredentials_file = \"{}\"\n{extra}\n",
        creds.display()
    ))
    .await;
    drop(starting);
    let mut blueprint = testbox();
    blueprint["file_denylist"] = json!(denylist);
    let (status, body) = wings
        .post(
            "/api/servers",
            json!({
                "id": id,
                "blueprint": blueprint,
                "variables": {},
                "allocations": {"default": {"ip": "127.0.0.1", "port": common::free_port()}},
                "limits": disk_mb.map(|mb| json!({"memory_mb": 128, "cpu_percent": 100, "disk_mb": mb, "pids": 64})),
                "start_on_completion": false,
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    // "offline" is also the state before the install starts: wait for the install itself.
    wait_for("the install", TIMEOUT, || async {
        let server = wings.server(&id).await;
        (server["install"]["status"] == "installed").then_some(())
    })
    .await;
    (wings, users, id, dir)
}

fn login_name(user: &str, server: &str) -> String {
    format!("{user}.{}", &server[..8])
}

fn client() -> PathBuf {
    common::workspace_root().join("wings/tests/sftp_client.py")
}

/// Runs sftp_client.py to completion and returns its JSON lines.
fn paramiko(wings: &Wings, login: &str, auth: &[&str], action: &[&str]) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(client())
        .arg(wings.sftp_port.to_string())
        .arg(login)
        .args(auth)
        .args(action)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sftp_client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn password(p: &str) -> [&str; 2] {
    ["--password", p]
}

#[tokio::test]
async fn logins_with_password_or_key_bind_to_one_server() {
    let (wings, users, id, _dir) = setup("", &["*"], &["file.read"]).await;
    let alice = login_name("alice", &id);
    let key = users.key.to_str().unwrap();

    assert_eq!(
        paramiko(&wings, &alice, &password(PASSWORD), &["login"])[0]["ok"],
        true
    );
    assert_eq!(
        paramiko(&wings, &alice, &["--key", key], &["login"])[0]["ok"],
        true
    );
    assert_eq!(
        paramiko(&wings, &login_name("bob", &id), &password(PASSWORD), &["login"])[0]["ok"],
        true
    );

    // Refused: wrong password, bob's name with alice's key, a server that does not exist, a
    // name without a server part.
    for (login, auth) in [
        (alice.clone(), password("wrong").to_vec()),
        (login_name("bob", &id), vec!["--key", key]),
        (format!("alice.{}", "zzzzzzzz"), password(PASSWORD).to_vec()),
        ("alice".to_string(), password(PASSWORD).to_vec()),
    ] {
        let result = &paramiko(&wings, &login, &auth, &["login"])[0];
        assert_eq!(result["ok"], false, "{login} {auth:?}: {result}");
    }

    // Only the sftp subsystem is served: no shell, no commands.
    for kind in ["shell", "exec"] {
        let result = &paramiko(&wings, &alice, &password(PASSWORD), &["channel", kind])[0];
        assert_eq!(result["ok"], false, "{kind}: {result}");
    }
}

#[tokio::test]
async fn failed_logins_are_limited_per_user_then_per_address() {
    let (wings, users, id, _dir) = setup(
        "failed_logins_per_user = 3\nfailed_logins_per_ip = 8\n",
        &["*"],
        &["*"],
    )
    .await;
    let alice = login_name("alice", &id);
    let bob = login_name("bob", &id);
    let key = users.key.to_str().unwrap();

    // Three wrong passwords for alice: now even her right password is refused...
    let r = paramiko(&wings, &alice, &password("wrong"), &["attempts", "3"]);
    assert_eq!(r[0]["results"], json!([false, false, false]));
    assert_eq!(
        paramiko(&wings, &alice, &password(PASSWORD), &["login"])[0]["ok"],
        false
    );
    // ...but bob, and alice's key, still get in: the lock is on alice's password logins.
    assert_eq!(
        paramiko(&wings, &bob, &password(PASSWORD), &["login"])[0]["ok"],
        true
    );
    assert_eq!(
        paramiko(&wings, &alice, &["--key", key], &["login"])[0]["ok"],
        true
    );

    // Failures so far from 127.0.0.1: 3 + 1. Four more with made-up names reach the address
    // limit of 8, after which every login from it is refused, keys included.
    let r = paramiko(
        &wings,
        &format!("nobody.{}", &id[..8]),
        &password("x"),
        &["attempts", "4"],
    );
    assert_eq!(r[0]["results"], json!([false, false, false, false]));
    assert_eq!(
        paramiko(&wings, &bob, &password(PASSWORD), &["login"])[0]["ok"],
        false
    );
    assert_eq!(
        paramiko(&wings, &alice, &["--key", key], &["login"])[0]["ok"],
        false
    );
    assert!(wings.log().contains("SFTP login failed"));
}

/// Reads what the server sends until it closes the connection or 10 s pass.
fn drain(mut stream: TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > 1 << 20 {
            break;
        }
    }
    got
}

/// A packet in the SSH binary packet format (unencrypted, as before key exchange).
fn ssh_packet(payload: &[u8], declared_len: Option<u32>) -> Vec<u8> {
    let padding = 8 - (payload.len() + 5) % 8 + 8;
    let len = declared_len.unwrap_or((payload.len() + padding + 1) as u32);
    let mut p = len.to_be_bytes().to_vec();
    p.push(padding as u8);
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0u8, padding));
    p
}

#[tokio::test]
async fn hostile_bytes_before_and_during_the_handshake_never_crash_wings() {
    let (mut wings, _users, id, _dir) = setup("", &["*"], &[]).await;
    let addr = format!("127.0.0.1:{}", wings.sftp_port);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let kexinit_garbage = {
        let mut payload = vec![20u8]; // SSH_MSG_KEXINIT
        payload.extend(noise(16)); // cookie
        payload.extend(0xffff_fff0_u32.to_be_bytes()); // a name-list "length" far past the end
        payload.extend(noise(64));
        payload
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes instead of a version", noise(64 * 1024)),
        ("a version line that never ends", vec![b'S'; 256 * 1024]),
        (
            "binary before the version",
            b"\0\0\0\x0c\x0a\x14garbage\r\n".to_vec(),
        ),
        (
            "version, then noise",
            [b"SSH-2.0-evil\r\n".to_vec(), noise(4096)].concat(),
        ),
        (
            "version, then a huge packet length",
            [b"SSH-2.0-evil\r\n".to_vec(), ssh_packet(&[20], Some(0x7fff_ffff))].concat(),
        ),
        (
            "version, then a KEXINIT with lying name-list lengths",
            [b"SSH-2.0-evil\r\n".to_vec(), ssh_packet(&kexinit_garbage, None)].concat(),
        ),
        (
            "version, then a packet of an unknown type",
            [b"SSH-2.0-evil\r\n".to_vec(), ssh_packet(&[250, 1, 2, 3], None)].concat(),
        ),
        ("SSH-1 version", b"SSH-1.5-old\r\n".to_vec()),
    ];
    for (what, bytes) in &cases {
        let mut stream = TcpStream::connect(&addr).unwrap();
        // The server may hang up before reading everything; that is a fine answer.
        let _ = stream.write_all(bytes);
        let answer = drain(stream);
        assert!(
            answer.is_empty() || answer.starts_with(b"SSH-2.0-"),
            "{what}: unexpected answer {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(64)])
        );
        assert!(wings.try_alive(), "wings died on: {what}");
    }
    // Many half-open connections that just sit there do not stop others from logging in.
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let alice = login_name("alice", &id);
    assert_eq!(
        paramiko(&wings, &alice, &password(PASSWORD), &["login"])[0]["ok"],
        true
    );
    drop(idle);
    let (status, _) = wings.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(wings.try_alive());
}

/// Starts `sftp_client.py ... hold` and waits for it to report the session open.
type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

async fn hold(wings: &Wings, login: &str, auth: &[&str]) -> (tokio::process::Child, Lines) {
    let mut child = tokio::process::Command::new("python3")
        .arg(client())
        .arg(wings.sftp_port.to_string())
        .arg(login)
        .args(auth)
        .arg("hold")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["ready"],
        true,
        "{first}"
    );
    (child, lines)
}

async fn next(lines: &mut Lines) -> Value {
    let line = tokio::time::timeout(TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    serde_json::from_str(&line).unwrap()
}

async fn closed(lines: &mut Lines) -> bool {
    next(lines).await["closed"] == true
}

/// Asks a held session whether it still works.
async fn ping(child: &mut tokio::process::Child, lines: &mut Lines) -> Value {
    use tokio::io::AsyncWriteExt as _;
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"ping\n").await.unwrap();
    stdin.flush().await.unwrap();
    next(lines).await
}

#[tokio::test]
async fn deauthorizing_a_user_closes_their_sessions_and_deleting_the_server_closes_all() {
    let (wings, _users, id, _dir) = setup("", &["*"], &["*"]).await;
    let (_a, mut alice) = hold(&wings, &login_name("alice", &id), &password(PASSWORD)).await;
    let (mut b, mut bob) = hold(&wings, &login_name("bob", &id), &password(PASSWORD)).await;

    let (status, body) = wings
        .post(
            &format!("/api/servers/{id}/deauthorize"),
            json!({"user": "u-alice"}),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert!(closed(&mut alice).await, "alice's session is closed");
    wait_for("the log to say why", TIMEOUT, || async {
        wings.log().contains("access was revoked").then_some(())
    })
    .await;

    // Bob's session is untouched by alice's revocation; deleting the server ends it.
    assert_eq!(ping(&mut b, &mut bob).await["alive"], true);
    let (status, body) = wings.delete(&format!("/api/servers/{id}")).await;
    assert!(status == 202 || status == 204, "{status} {body}");
    assert!(closed(&mut bob).await, "bob's session is closed");
}

#[tokio::test]
async fn a_server_takes_no_more_sessions_than_its_limit() {
    let (wings, users, id, _dir) = setup("max_sessions_per_server = 2", &["*"], &["*"]).await;
    let alice = login_name("alice", &id);
    let (first, _first_lines) = hold(&wings, &alice, &password(PASSWORD)).await;
    let (_second, _second_lines) = hold(&wings, &login_name("bob", &id), &password(PASSWORD)).await;

    // Good credentials, one session too many: the client is told why, and gets no subsystem.
    let (ok, out) = openssh_sftp(&wings, &users, &alice, "pwd\n");
    assert!(!ok, "{out}");
    assert!(
        out.contains("too many SFTP sessions are open for this server"),
        "{out}"
    );
    let refused = paramiko(&wings, &alice, &password(PASSWORD), &["login"]);
    assert_eq!(refused[0]["ok"], false, "{refused:?}");

    // A session that ends frees its place; the refusals above locked nobody out.
    drop(first);
    wait_for("a freed place to be taken", TIMEOUT, || async {
        let again = paramiko(&wings, &alice, &password(PASSWORD), &["login"]);
        (again[0]["ok"] == true).then_some(())
    })
    .await;
}

fn root(wings: &Wings, id: &str) -> PathBuf {
    wings.data_dir().join("volumes").join(id)
}

fn ops(wings: &Wings, login: &str, ops: Value) -> Vec<Value> {
    paramiko(wings, login, &password(PASSWORD), &["ops", &ops.to_string()])
}

#[tokio::test]
async fn paramiko_uploads_downloads_lists_renames_and_deletes() {
    let (wings, _users, id, _dir) = setup("", &["*"], &[]).await;
    let alice = login_name("alice", &id);
    let results = ops(
        &wings,
        &alice,
        json!([
            {"op": "mkdir", "path": "/plugins"},
            {"op": "put", "path": "/plugins/a.txt", "data": "0123456789", "repeat": 100000},
            {"op": "stat", "path": "plugins/a.txt"},
            {"op": "get", "path": "/plugins/../plugins/a.txt"},
            {"op": "list", "path": "/plugins"},
            {"op": "rename", "from": "/plugins/a.txt", "to": "/plugins/b.txt"},
            {"op": "append", "path": "/plugins/b.txt", "data": "!"},
            {"op": "truncate", "path": "/plugins/b.txt", "size": 5},
            {"op": "get", "path": "/plugins/b.txt"},
            {"op": "chmod", "path": "/plugins/b.txt", "mode": 0o600},
            {"op": "stat", "path": "/plugins/b.txt"},
            {"op": "realpath", "path": "../../.."},
            {"op": "remove", "path": "/plugins/b.txt"},
            {"op": "rmdir", "path": "/plugins"},
            {"op": "list", "path": "/"},
        ]),
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["ok"], true, "step {i}: {r}");
    }
    assert_eq!(results[2]["size"], 1_000_000);
    assert_eq!(results[3]["data"].as_str().unwrap().len(), 1_000_000);
    assert_eq!(results[4]["names"], json!(["a.txt"]));
    assert_eq!(results[8]["data"], "01234");
    assert_eq!(results[10]["mode"].as_u64().unwrap() & 0o777, 0o600);
    assert_eq!(results[11]["path"], "/");
    assert!(
        !results[14]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("plugins"))
    );
    assert!(!root(&wings, &id).join("plugins").exists());
}

#[tokio::test]
async fn permissions_are_enforced_per_operation() {
    // alice may read and download; bob may only list.
    let (wings, _users, id, _dir) = setup("", &["file.read", "file.read-content"], &["file.read"]).await;
    std::fs::create_dir_all(root(&wings, &id).join("cfg")).unwrap();
    std::fs::write(root(&wings, &id).join("cfg/server.properties"), "motd=hi\n").unwrap();
    let alice = ops(
        &wings,
        &login_name("alice", &id),
        json!([
            {"op": "get", "path": "/cfg/server.properties"},
            {"op": "put", "path": "/cfg/new.txt", "data": "x"},
            {"op": "put", "path": "/cfg/server.properties", "data": "motd=pwned"},
            {"op": "mkdir", "path": "/d"},
            {"op": "rename", "from": "/cfg/server.properties", "to": "/cfg/x"},
            {"op": "remove", "path": "/cfg/server.properties"},
            {"op": "chmod", "path": "/cfg/server.properties", "mode": 0o777},
            {"op": "symlink", "target": "server.properties", "path": "/cfg/l"},
        ]),
    );
    assert_eq!(alice[0]["ok"], true, "{}", alice[0]);
    assert_eq!(alice[0]["data"], "motd=hi\n");
    for (i, r) in alice.iter().enumerate().skip(1) {
        assert_eq!(r["ok"], false, "alice step {i}: {r}");
        assert!(
            r["error"].as_str().unwrap().contains("ermission"),
            "alice step {i}: {r}"
        );
    }
    let bob = ops(
        &wings,
        &login_name("bob", &id),
        json!([
            {"op": "list", "path": "/cfg"},
            {"op": "stat", "path": "/cfg/server.properties"},
            {"op": "get", "path": "/cfg/server.properties"},
        ]),
    );
    assert_eq!(bob[0]["names"], json!(["server.properties"]));
    assert_eq!(bob[1]["ok"], true);
    assert_eq!(bob[2]["ok"], false, "{}", bob[2]);
    // Nothing changed on disk.
    assert_eq!(
        std::fs::read_to_string(root(&wings, &id).join("cfg/server.properties")).unwrap(),
        "motd=hi\n"
    );
    assert!(!root(&wings, &id).join("cfg/new.txt").exists());
    assert!(!root(&wings, &id).join("d").exists());
}

#[tokio::test]
async fn writes_past_the_quota_are_refused() {
    let (wings, _users, id, _dir) = setup_with("", &["*"], &[], Some(2), &[]).await;
    let alice = login_name("alice", &id);
    // 3 MB into a 2 MiB quota: refused part way, and the file never passes the quota.
    let r = ops(
        &wings,
        &alice,
        json!([
            {"op": "put", "path": "/big.bin", "data": "0123456789abcdef", "repeat": 196_608},
            {"op": "stat", "path": "/big.bin"},
            {"op": "put", "path": "/small.txt", "data": "fits"},
        ]),
    );
    assert_eq!(r[0]["ok"], false, "{}", r[0]);
    assert!(r[0]["error"].as_str().unwrap().contains("quota"), "{}", r[0]);
    let size = std::fs::metadata(root(&wings, &id).join("big.bin")).map_or(0, |m| m.len());
    assert!(size <= 2 * 1024 * 1024, "{size} bytes written");
    // Removing the partial file frees the space again.
    let r = ops(
        &wings,
        &alice,
        json!([
            {"op": "remove", "path": "/big.bin"},
            {"op": "put", "path": "/ok.bin", "data": "0123456789abcdef", "repeat": 65_536},
        ]),
    );
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    assert_eq!(r[1]["ok"], true, "{}", r[1]);
    assert_eq!(
        std::fs::metadata(root(&wings, &id).join("ok.bin")).unwrap().len(),
        1024 * 1024
    );
}

#[tokio::test]
async fn symlinks_planted_in_the_container_and_traversal_never_leave_the_root() {
    let (wings, _users, id, _dir) = setup_with("", &["*"], &[], None, &["secret.txt"]).await;
    let root = root(&wings, &id);
    std::fs::write(root.join("secret.txt"), "denied").unwrap();
    // Another server's folder on the same node, which the links below also aim at.
    let neighbour = wings.data_dir().join("volumes").join("neighbour");
    std::fs::create_dir_all(&neighbour).unwrap();
    std::fs::write(neighbour.join("data.txt"), "not yours").unwrap();
    let (status, body) = wings.power(&id, "start").await;
    assert_eq!(status, 202, "{body}");
    wings.wait_state(&id, "running", TIMEOUT).await;
    let plant = format!(
        "cd /home/container && ln -s / rootlink && ln -s /etc/passwd passwd && ln -s /etc etc \
         && ln -s ../../../.. up && ln -s {} neighbour && ln -s secret.txt alias",
        neighbour.display()
    );
    let (ok, out) = common::docker(&["exec", &format!("mamba-{id}"), "sh", "-c", &plant]);
    assert!(ok, "planting links in the container failed: {out}");
    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    let passwd_mode = std::fs::metadata("/etc/passwd").unwrap().permissions();

    let long = "a".repeat(5000);
    let r = ops(
        &wings,
        &login_name("alice", &id),
        json!([
            {"op": "get", "path": "/passwd"},
            {"op": "get", "path": "/rootlink/etc/passwd"},
            {"op": "list", "path": "/rootlink"},
            {"op": "list", "path": "/etc"},
            {"op": "list", "path": "/up"},
            {"op": "get", "path": "/neighbour/data.txt"},
            {"op": "put", "path": "/etc/mamba-evil", "data": "x"},
            {"op": "put", "path": "/neighbour/evil.txt", "data": "x"},
            {"op": "chmod", "path": "/passwd", "mode": 0o777},
            {"op": "truncate", "path": "/passwd", "size": 0},
            {"op": "symlink", "target": "/etc", "path": "/abs"},
            {"op": "symlink", "target": "../../../../etc", "path": "/rel"},
            {"op": "get", "path": "/alias"},
            {"op": "get", "path": "/secret.txt"},
            {"op": "get", "path": "/../../../../etc/passwd"},
            {"op": "get", "path": "..\\..\\etc\\passwd"},
            {"op": "get", "path": "/a\u{0}b"},
            {"op": "get", "path": format!("/{long}")},
            // Allowed: describing and removing the links themselves, and a link that stays in.
            {"op": "readlink", "path": "/rootlink"},
            {"op": "lstat", "path": "/passwd"},
            {"op": "remove", "path": "/passwd"},
            {"op": "rename", "from": "/etc", "to": "/etc-link"},
            {"op": "symlink", "target": "alias-target.txt", "path": "/inside"},
        ]),
    );
    for (i, result) in r.iter().enumerate().take(18) {
        assert_eq!(result["ok"], false, "step {i} must be refused: {result}");
    }
    for (i, result) in r.iter().enumerate().skip(18) {
        assert_eq!(result["ok"], true, "step {i}: {result}");
    }
    assert_eq!(r[18]["target"], "/");
    // The host and the neighbour are untouched; the links went, not their targets.
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), host_passwd);
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().permissions(),
        passwd_mode
    );
    assert!(!Path::new("/etc/mamba-evil").exists());
    assert_eq!(std::fs::read_dir(&neighbour).unwrap().count(), 1);
    assert!(root.join("passwd").symlink_metadata().is_err());
    assert!(
        root.join("etc-link")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(root.join("abs").symlink_metadata().is_err() && root.join("rel").symlink_metadata().is_err());
    let _ = wings.power(&id, "kill").await;
}

fn openssh_args(wings: &Wings, key: &Path) -> Vec<String> {
    [
        "-P",
        &wings.sftp_port.to_string(),
        "-i",
        key.to_str().unwrap(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `sftp -b -` with `batch` on stdin; answers whether every command succeeded, and the
/// output.
fn openssh_sftp(wings: &Wings, users: &Users, login: &str, batch: &str) -> (bool, String) {
    let mut child = Command::new("sftp")
        .args(openssh_args(
            wings,
            if login.starts_with("bob.") {
                &users.bob_key
            } else {
                &users.key
            },
        ))
        .args(["-b", "-"])
        .arg(format!("{login}@127.0.0.1"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(batch.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn openssh_sftp_in_batch_mode() {
    let (wings, users, id, dir) = setup("", &["*"], &["file.read", "file.read-content"]).await;
    let alice = login_name("alice", &id);
    let source = dir.path().join("upload.bin");
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&source, &data).unwrap();
    let back = dir.path().join("download.bin");
    let batch = format!(
        "mkdir /world\nput {} /world/region.bin\nls -l /world\nrename /world/region.bin /world/r.bin\n\
         get /world/r.bin {}\nln -s r.bin /world/latest\nchmod 600 /world/r.bin\ncd /world\nls\n\
         rm /world/latest\nrm /world/r.bin\nrmdir /world\nls /\n",
        source.display(),
        back.display()
    );
    let (ok, out) = openssh_sftp(&wings, &users, &alice, &batch);
    assert!(ok, "{out}");
    assert!(out.contains("region.bin"), "{out}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert!(!root(&wings, &id).join("world").exists());

    // Each of these must fail (sftp -b stops with a non-zero status at a failing command).
    std::fs::write(root(&wings, &id).join("keep.txt"), "keep").unwrap();
    for (login, command) in [
        (alice.clone(), "ln -s /etc /etc-link".to_string()),
        (alice.clone(), "ln -s ../../../etc /up".to_string()),
        (
            alice.clone(),
            "cd /../..\nget /../../etc/shadow /dev/null".to_string(),
        ),
        (
            login_name("bob", &id),
            format!("put {} /new.bin", source.display()),
        ),
        (login_name("bob", &id), "rm /keep.txt".to_string()),
        (login_name("bob", &id), "rename /keep.txt /moved.txt".to_string()),
        (login_name("bob", &id), "mkdir /dir".to_string()),
    ] {
        let (ok, out) = openssh_sftp(&wings, &users, &login, &format!("{command}\n"));
        assert!(!ok, "{login}: {command:?} should fail: {out}");
    }
    // bob may download.
    let (ok, out) = openssh_sftp(
        &wings,
        &users,
        &login_name("bob", &id),
        &format!("get /keep.txt {}\n", back.display()),
    );
    assert!(ok, "{out}");
    assert!(root(&wings, &id).join("keep.txt").exists());
}

/// The `Size Used Avail` KiB figures `sftp`'s `df` printed.
fn df_figures(out: &str) -> Option<(u64, u64, u64)> {
    let mut lines = out.lines().skip_while(|l| !l.contains("Size"));
    lines.next()?;
    let numbers: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .filter_map(|n| n.trim_end_matches('%').parse().ok())
        .collect();
    Some((*numbers.first()?, *numbers.get(1)?, *numbers.get(2)?))
}

#[tokio::test]
async fn openssh_df_shows_the_quota_as_the_disk() {
    let (wings, users, id, dir) = setup_with("", &["*"], &[], Some(2), &[]).await;
    let alice = login_name("alice", &id);
    let (ok, out) = openssh_sftp(&wings, &users, &alice, "df\n");
    assert!(ok, "{out}");
    let (size, used, free) = df_figures(&out).unwrap_or_else(|| panic!("no df figures in {out}"));
    assert_eq!(size, 2048, "{out}");
    assert_eq!(used + free, size, "{out}");
    // A 1 MiB upload through SFTP counts against the quota at once.
    let source = dir.path().join("one.bin");
    std::fs::write(&source, vec![7u8; 1 << 20]).unwrap();
    let (ok, out) = openssh_sftp(
        &wings,
        &users,
        &alice,
        &format!("put {} /one.bin\ndf\n", source.display()),
    );
    assert!(ok, "{out}");
    let (size_after, used_after, free_after) =
        df_figures(&out).unwrap_or_else(|| panic!("no df figures in {out}"));
    assert_eq!(size_after, 2048, "{out}");
    assert_eq!(used_after, used + 1024, "{out}");
    assert_eq!(free_after, free - 1024, "{out}");
    // A path that does not exist is an error, as with OpenSSH's own server.
    let (ok, out) = openssh_sftp(&wings, &users, &alice, "df /missing\n");
    assert!(!ok, "{out}");
}

/// Unmounts a FUSE mount when dropped, also when the test fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount3").arg("-u").arg(&self.0).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[tokio::test]
async fn sshfs_mounts_the_server_folder() {
    let (wings, users, id, dir) = setup("", &["*"], &[]).await;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut args = vec![format!("{}@127.0.0.1:/", login_name("alice", &id))];
    args.push(mnt.display().to_string());
    for option in [
        format!("port={}", wings.sftp_port),
        format!("IdentityFile={}", users.key.display()),
        "StrictHostKeyChecking=no".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "BatchMode=yes".into(),
        "IdentitiesOnly=yes".into(),
    ] {
        args.push("-o".into());
        args.push(option);
    }
    let out = Command::new("sshfs").args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() && (err.contains("/dev/fuse") || err.contains("fuse: device")) {
        // Not faked: without a FUSE device this test cannot run, and says so.
        eprintln!("SKIPPED sshfs_mounts_the_server_folder: FUSE is unavailable here: {err}");
        return;
    }
    assert!(out.status.success(), "sshfs failed: {err}");
    let _mount = Mount(mnt.clone());
    let root = root(&wings, &id);

    std::fs::write(mnt.join("hello.txt"), "hi from sshfs").unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "hi from sshfs"
    );
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("big.bin"), &big).unwrap();
    assert_eq!(std::fs::read(mnt.join("big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(root.join("big.bin")).unwrap(), big);
    std::fs::create_dir(mnt.join("d")).unwrap();
    std::fs::rename(mnt.join("hello.txt"), mnt.join("d/h.txt")).unwrap();
    let names: Vec<String> = std::fs::read_dir(mnt.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["h.txt"]);
    std::os::unix::fs::symlink("h.txt", mnt.join("d/l")).unwrap();
    assert_eq!(std::fs::read_to_string(mnt.join("d/l")).unwrap(), "hi from sshfs");
    assert!(std::os::unix::fs::symlink("../../../../etc", mnt.join("up")).is_err());
    assert!(std::os::unix::fs::symlink("/etc", mnt.join("abs")).is_err());
    assert!(root.join("up").symlink_metadata().is_err() && root.join("abs").symlink_metadata().is_err());
    std::fs::remove_file(mnt.join("d/l")).unwrap();
    std::fs::remove_file(mnt.join("d/h.txt")).unwrap();
    std::fs::remove_dir(mnt.join("d")).unwrap();
    std::fs::remove_file(mnt.join("big.bin")).unwrap();
    assert!(!root.join("d").exists() && !root.join("big.bin").exists());
}

#[tokio::test]
async fn a_folder_swapped_for_a_symlink_in_a_loop_never_lets_a_write_out() {
    let (wings, _users, id, _dir) = setup("", &["*"], &[]).await;
    let root = root(&wings, &id);
    std::fs::create_dir(root.join("real")).unwrap();
    std::fs::set_permissions(
        root.join("real"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let (status, body) = wings.power(&id, "start").await;
    assert_eq!(status, 202, "{body}");
    wings.wait_state(&id, "running", TIMEOUT).await;
    // Inside the container: swap the folder for a link to / and back, as fast as it can.
    let race =
        "cd /home/container && while true; do mv real real2; ln -s / real; rm real; mv real2 real; done";
    let (ok, out) = common::docker(&["exec", "-d", &format!("mamba-{id}"), "sh", "-c", race]);
    assert!(ok, "{out}");
    let marker = unique_id("sftp-race");
    let writes: Vec<Value> = (0..300)
        .map(|i| json!({"op": "put", "path": format!("/real/{marker}-{i}"), "data": "x"}))
        .collect();
    let results = ops(&wings, &login_name("alice", &id), Value::Array(writes));
    assert_eq!(results.len(), 300);
    let _ = wings.power(&id, "kill").await;
    // Whatever won each race, nothing was written outside the server's folder.
    for outside in [Path::new("/"), Path::new("/etc"), Path::new("/tmp")] {
        let leaked = std::fs::read_dir(outside)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&marker)
            })
            .count();
        assert_eq!(leaked, 0, "a write escaped into {}", outside.display());
    }
    wings.wait_state(&id, "offline", TIMEOUT).await;
    // Count the written files anywhere in the server's folder (the loop may have left the
    // folder inside another), never following links.
    let mut inside = 0;
    let mut folders = vec![root.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                folders.push(entry.path());
            } else if kind.is_file() && entry.file_name().to_string_lossy().starts_with(&marker) {
                inside += 1;
            }
        }
    }
    let succeeded = results.iter().filter(|r| r["ok"] == true).count();
    assert_eq!(inside, succeeded, "every write that succeeded landed inside");
    // The race was really run: some writes met the folder while it was a link to /.
    let refused = results
        .iter()
        .filter(|r| {
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("leaves the server root"))
        })
        .count();
    assert!(
        refused > 0,
        "no write met the swapped folder; the test proves nothing"
    );
}
