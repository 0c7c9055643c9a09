#!/usr/bin/env python3
"""Create-to-running: the time from one API call to a game server that runs, through the panel
(placement, ports, a durable job that pushes the spec to an enrolled wings over mutual TLS,
install, start) against creating the same server directly on a wings, side by side in one run.

    python3 scripts/bench/create_to_running.py [--rounds 5] [--blueprint freeciv]

Needs the panel, wings and the dev_enroll example in $CARGO_TARGET_DIR/$PROFILE
(PROFILE=release by default: `cargo build --release -p mamba-panel -p mamba-wings --bins
--example dev_enroll`), the game image (scripts/images.sh) and root (wings drives Docker).
Two wings run on this machine: one enrolled to the panel, one enrolled to a throwaway CA and
driven directly (scripts/bench/wings_dev.py). Rounds alternate between the two paths. The
panel runs with its default job settings (`jobs.poll_interval_ms` 1000), as an operator would.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wings_dev  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROFILE = os.environ.get("PROFILE", "release")
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "mamba" / "target")) / (
    "debug" if PROFILE == "dev" else PROFILE
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, token=None, context=None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as r:
            text = r.read()
            return r.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text.decode(errors="replace")}


def wait(what: str, timeout: float, check):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wings_config(path: Path, data_dir: Path, api: int, public: int, sftp: int) -> None:
    path.write_text(
        f'[api]\nlisten = "127.0.0.1:{api}"\npublic_listen = "127.0.0.1:{public}"\n\n'
        f'[sftp]\nlisten = "127.0.0.1:{sftp}"\n\n[system]\ndata_dir = "{data_dir}"\n'
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blueprint", default="freeciv")
    args = parser.parse_args()
    for name in ("panel", "wings", "examples/dev_enroll"):
        if not os.access(TARGET / name, os.X_OK):
            raise SystemExit(f"missing {TARGET / name}: see this script's docstring")
    blueprint = yaml.safe_load((ROOT / "blueprints" / f"{args.blueprint}.yaml").read_text())

    work = Path(tempfile.mkdtemp(prefix="mamba-bench-ctr-"))
    procs: list[subprocess.Popen] = []
    try:
        panel_port, node_port = free_port(), free_port()
        env = dict(
            os.environ,
            DATABASE_URL=f"sqlite://{work}/panel.db",
            PANEL_MASTER_KEY="KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=",
            PANEL_HTTP__LISTEN=f"127.0.0.1:{panel_port}",
            PANEL_HTTP__PUBLIC_URL=f"http://127.0.0.1:{panel_port}",
            PANEL_NODE_LISTENER__LISTEN=f"127.0.0.1:{node_port}",
            PANEL_NODE_LISTENER__PUBLIC_URL=f"https://127.0.0.1:{node_port}",
            RUST_LOG="warn",
        )
        created = subprocess.run(
            [TARGET / "panel", "admin", "create-user", "--email", "bench@example.test"],
            env=env, cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
        password = next(l.split(":", 1)[1].strip() for l in created.splitlines() if l.startswith("password:"))
        procs.append(subprocess.Popen([TARGET / "panel", "serve"], env=env, cwd=ROOT,
                                      stdout=open(work / "panel.log", "w"), stderr=subprocess.STDOUT))
        wait("the panel", 60, lambda: healthy(panel_port))
        base = f"http://127.0.0.1:{panel_port}"
        _, login = http("POST", f"{base}/api/v1/auth/login",
                        {"email": "bench@example.test", "password": password, "client": "api"})
        token = login["tokens"]["access_token"]
        _, tenant = http("POST", f"{base}/api/v1/tenants", {"slug": "bench", "name": "Bench"}, token)
        http("PUT", f"{base}/api/v1/admin/tenants/{tenant['id']}/quota", {"max_servers": 1000}, token)

        # wings A, enrolled to the panel.
        a_api, a_public, a_sftp = free_port(), free_port(), free_port()
        status, node = http("POST", f"{base}/api/v1/admin/nodes", {
            "name": "bench", "fqdn": "127.0.0.1", "location": "bench", "cpu_percent": 800,
            "memory_mb": 65536, "disk_mb": 1000000, "api_port": a_api,
            "public_url": f"http://127.0.0.1:{a_public}", "sftp_port": a_sftp}, token)
        assert status == 201, node
        http("POST", f"{base}/api/v1/admin/nodes/{node['id']}/pools",
             {"ips": ["127.0.0.1"], "ports": ["30000-30999"]}, token)
        _, enroll = http("POST", f"{base}/api/v1/admin/nodes/{node['id']}/enrollment-token", {}, token)
        (work / "a").mkdir()
        wings_config(work / "a.toml", work / "a", a_api, a_public, a_sftp)
        subprocess.run([TARGET / "wings", "--config", work / "a.toml", "enroll", "--panel",
                        f"https://127.0.0.1:{node_port}", "--token", enroll["token"]],
                       check=True, capture_output=True)
        procs.append(subprocess.Popen([TARGET / "wings", "--config", work / "a.toml"],
                                      stdout=open(work / "a.log", "w"), stderr=subprocess.STDOUT))
        wait("wings A", 60, lambda: healthy(a_public))
        # Placement takes only nodes that have been heard from: wings heartbeats as it starts.
        wait("wings A's first heartbeat", 60, lambda: http(
            "GET", f"{base}/api/v1/admin/nodes/{node['id']}", token=token)[1].get("connectivity") == "online")

        # wings B, driven directly as the panel would (throwaway CA).
        b_api, b_public, b_sftp = free_port(), free_port(), free_port()
        (work / "b").mkdir()
        wings_dev.enroll(work / "b", work / "b-client", TARGET / "examples" / "dev_enroll")
        wings_config(work / "b.toml", work / "b", b_api, b_public, b_sftp)
        procs.append(subprocess.Popen([TARGET / "wings", "--config", work / "b.toml"],
                                      stdout=open(work / "b.log", "w"), stderr=subprocess.STDOUT))
        wait("wings B", 60, lambda: healthy(b_public))
        b_ctx = wings_dev.ssl_context(work / "b-client")
        b_base = f"https://127.0.0.1:{b_api}"

        servers = f"{base}/api/v1/tenants/{tenant['id']}/servers"
        through_panel, direct = [], []
        for round_no in range(args.rounds):
            name = f"ctr-{round_no}-{secrets.token_hex(3)}"
            t0 = time.monotonic()
            status, answer = http("POST", servers, {"name": name, "blueprint": args.blueprint}, token)
            assert status == 202, answer
            sid = answer["server"]["id"]
            wait("the panel's server to run", 600,
                 lambda: http("GET", f"{servers}/{sid}", token=token)[1].get("status") == "running")
            through_panel.append(time.monotonic() - t0)

            did = f"direct-{round_no}-{secrets.token_hex(3)}"
            t0 = time.monotonic()
            status, answer = http("POST", f"{b_base}/api/servers", {
                "id": did, "blueprint": blueprint,
                "allocations": {"default": {"ip": "127.0.0.1", "port": 31000 + round_no}},
                "start_on_completion": True}, context=b_ctx)
            assert status == 202, answer
            wait("the direct server to run", 600,
                 lambda: http("GET", f"{b_base}/api/servers/{did}", context=b_ctx)[1].get("state") == "running")
            direct.append(time.monotonic() - t0)

            http("DELETE", f"{servers}/{sid}", token=token)
            http("DELETE", f"{b_base}/api/servers/{did}", context=b_ctx)
            wait("the panel's delete", 120, lambda: http("GET", f"{servers}/{sid}", token=token)[0] == 404)
            print(f"round {round_no + 1}: panel {through_panel[-1]:.2f}s, direct {direct[-1]:.2f}s", flush=True)

        p, d = statistics.median(through_panel), statistics.median(direct)
        print(json.dumps({
            "blueprint": args.blueprint, "rounds": args.rounds, "profile": PROFILE,
            "through_panel_s": {"median": round(p, 3), "min": round(min(through_panel), 3),
                                "max": round(max(through_panel), 3)},
            "direct_on_wings_s": {"median": round(d, 3), "min": round(min(direct), 3),
                                  "max": round(max(direct), 3)},
            "panel_over_direct": round(p / d, 2),
        }, indent=2))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for label_dir in (work / "a", work / "b"):
            ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=mamba.data-dir={label_dir}"],
                                 capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
