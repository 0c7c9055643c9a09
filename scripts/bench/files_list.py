#!/usr/bin/env python3
"""Listing a folder of 100,000 entries through wings' file API, next to `ls -la` of the
same folder, in one run.

Starts the release wings with a fresh data folder, creates one (never started) testbox
server, fills `big/` in its folder with N empty files (default 100,000), then for each round
(alternating which goes first) times:

- `ls -la big` (output to /dev/null) under /usr/bin/time: wall time and peak RSS;
- `GET /api/servers/{id}/files/list?directory=big&per_page=N`: the whole folder in one
  answer (name, size, mode, mtime, type and symlink target of every entry, as JSON), timed
  until the last byte of the body is read;
- the first page a file manager shows (`per_page=1000`).

wings' memory is read from /proc: resident before the first listing and its peak (VmHWM)
after all rounds. The report goes to stdout as Markdown; progress to stderr.

Needs root, Docker and mamba/testbox:latest (scripts/images.sh). wings is enrolled with a
throwaway CA and called as the panel over mutual TLS (scripts/bench/wings_dev.py).

Usage, from the repository root:
    python3 scripts/bench/files_list.py [--entries 100000] [--rounds 5] [--wings PATH]
The wings binary defaults to $CARGO_TARGET_DIR/release/wings
(cargo build --release -p mamba-wings --bin wings --example dev_enroll).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

import wings_dev

REPO = Path(__file__).resolve().parents[2]
CLIENT: Path | None = None  # the panel's client certificate, once wings is enrolled


def log(message: str) -> None:
    print(f"files_list bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    assert CLIENT is not None
    try:
        with urllib.request.urlopen(req, timeout=300, context=wings_dev.ssl_context(CLIENT)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def timed_ls(folder: Path) -> tuple[float, int]:
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", "ls", "-la", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
        text=True,
    )
    wall, rss = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss)


def timed_list(port: int, server: str, per_page: int, expect: int) -> float:
    start = time.perf_counter()
    status, body = request(port, "GET", f"/api/servers/{server}/files/list?directory=big&per_page={per_page}")
    elapsed = time.perf_counter() - start
    if status != 200:
        raise SystemExit(f"list answered {status}: {body[:300]!r}")
    listed = json.loads(body)
    if len(listed["entries"]) != expect or listed["total"] < expect:
        raise SystemExit(f"list returned {len(listed['entries'])} of {listed['total']}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/mamba/target"))
    parser.add_argument("--wings", default=f"{target}/release/wings")
    args = parser.parse_args()
    if not os.access(args.wings, os.X_OK):
        raise SystemExit(f"no wings binary at {args.wings} (cargo build --release -p mamba-wings)")

    global CLIENT
    work = Path(tempfile.mkdtemp(prefix="mamba-files-bench.", dir="/var/tmp"))
    port = free_port()
    data = work / "data"
    CLIENT = work / "client"
    wings_dev.enroll(data, CLIENT)
    (work / "wings.toml").write_text(
        f'[api]\nlisten = "127.0.0.1:{port}"\npublic_listen = "127.0.0.1:{free_port()}"\n\n'
        f'[system]\ndata_dir = "{data}"\n'
    )
    wings = subprocess.Popen(
        [args.wings, "--config", str(work / "wings.toml")],
        stdout=open(work / "wings.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    server = "bench-files"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if request(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("wings did not answer /healthz")
            time.sleep(0.1)
        blueprint = yaml.safe_load((REPO / "wings/tests/fixtures/testbox.yaml").read_text())
        status, body = request(
            port,
            "POST",
            "/api/servers",
            {
                "id": server,
                "blueprint": blueprint,
                "allocations": {"default": {"ip": "127.0.0.1", "port": free_port()}},
                "skip_install": True,
            },
        )
        if status != 202:
            raise SystemExit(f"create answered {status}: {body[:300]!r}")
        folder = data / "volumes" / server / "big"
        folder.mkdir()
        log(f"creating {args.entries} files in {folder}")
        for i in range(args.entries):
            os.close(os.open(folder / f"file-{i:06d}.dat", os.O_CREAT | os.O_WRONLY, 0o644))
        # Warm the dentry cache for both sides alike.
        timed_ls(folder)
        rss_before = proc_status(wings.pid)["VmRSS"]

        ls_runs, api_runs, page_runs = [], [], []
        for r in range(args.rounds):
            order = ["ls", "api"] if r % 2 == 0 else ["api", "ls"]
            for what in order:
                if what == "ls":
                    ls_runs.append(timed_ls(folder))
                else:
                    api_runs.append(timed_list(port, server, args.entries, args.entries))
            page_runs.append(timed_list(port, server, 1000, 1000))
            log(f"round {r + 1}: ls {ls_runs[-1][0]:.3f} s, API {api_runs[-1]:.3f} s, first page {page_runs[-1]:.3f} s")
        status = proc_status(wings.pid)
    finally:
        wings.terminate()
        try:
            wings.wait(timeout=10)
        except subprocess.TimeoutExpired:
            wings.kill()
        subprocess.run(["docker", "rm", "-f", f"mamba-{server}"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    ls_time = statistics.median(t for t, _ in ls_runs)
    ls_rss = max(m for _, m in ls_runs)
    api_time = statistics.median(api_runs)
    page_time = statistics.median(page_runs)
    print(f"Listing a folder of {args.entries:,} entries ({platform.node()}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds, medians):\n")
    print("| what | wall time | peak memory |")
    print("|---|---|---|")
    print(f"| `ls -la` (baseline) | {ls_time * 1000:.0f} ms | {ls_rss / 1024:.1f} MiB (the `ls` process) |")
    print(f"| wings `files/list`, all {args.entries:,} entries in one answer | {api_time * 1000:.0f} ms | "
          f"{status['VmHWM'] / 1024:.1f} MiB peak RSS of the whole daemon ({rss_before / 1024:.1f} MiB before listing) |")
    print(f"| wings `files/list`, first page of 1,000 | {page_time * 1000:.0f} ms | |")
    print(f"\nRatio wings / `ls -la` (whole folder): {api_time / ls_time:.2f}x the time.")


if __name__ == "__main__":
    main()
