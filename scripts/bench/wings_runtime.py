#!/usr/bin/env python3
"""Runtime benchmark for the wings node daemon, each figure next to its baseline.

Figures, all taken in one run against the release binary:

1. Resident memory of the wings process: idle right after start, and while it manages
   N (default 50) running testbox servers. Baseline: the memory reported for
   Pterodactyl's Go wings (quoted, not measured here).
2. Create-to-running latency of one server through the wings API. Baseline: the same
   container made by hand with `docker create` + `docker start`, measured in the same
   run and alternating with the wings iterations.
3. Wall time for N servers created at once through the API. Baseline: N concurrent
   `docker run -d` of the same container.

The report goes to stdout as Markdown; progress goes to stderr. `--json FILE` also writes
the raw numbers. Everything the run creates (servers, containers, the data folder, and the
Docker network if the run created it) is removed at the end, also when a step fails.

Needs root (wings chowns server folders to the container user), Docker, and the image
mamba/testbox:latest (built with scripts/images.sh when missing). wings is enrolled with a
throwaway CA and called as the panel over mutual TLS (scripts/bench/wings_dev.py; build
with `cargo build --release -p mamba-wings --bin wings --example dev_enroll`).

Usage, from the repository root:
    python3 scripts/bench/wings_runtime.py [--iterations 10] [--servers 50] [--wings PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import yaml

import wings_dev

REPO = Path(__file__).resolve().parents[2]
BLUEPRINT = REPO / "wings" / "tests" / "fixtures" / "testbox.yaml"
# Same default target folder as scripts/test.sh and scripts/run.sh.
DEFAULT_WINGS = (
    Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "mamba" / "target")) / "release" / "wings"
)
REPRODUCE = "python3 scripts/bench/wings_runtime.py"

IMAGE = "mamba/testbox:latest"
GAME_CMD = "/usr/local/bin/fake-game"
NETWORK = "mamba-bench"
# wings' default container_uid/gid; the baseline containers run as the same user.
CONTAINER_USER = "988:988"
READY = b"ready on port"
# Every baseline container carries this label (value: the run id) so cleanup finds them all.
RUN_LABEL = "mamba-bench.run"
# Baseline container names. wings names its containers "mamba-<server id>", so these must
# not start with "mamba-" to stay clear of them.
BASELINE_PREFIX = "bench-docker"

POLL_SECONDS = 0.02
WINGS_START_TIMEOUT = 30.0
ONE_SERVER_TIMEOUT = 60.0
MANY_SERVERS_TIMEOUT = 180.0
HTTP_TIMEOUT = 60.0
DOCKER_CLI_TIMEOUT = 120.0

IDLE_TARGET_MIB = 15.0
LOADED_TARGET_MIB = 40.0
LATENCY_RATIO_TARGET = 1.3
PTERODACTYL_IDLE = "19–32 MB right after start (reported for Pterodactyl's Go wings; not measured here)"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- small helpers


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for port 0. All sockets stay open until every port is
    picked, so the ports are distinct; they are free again when this returns."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (in KiB) and Threads from /proc/PID/status."""
    wanted = {"VmRSS", "VmHWM", "Threads"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0])
    return out


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least p% of samples at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def run(cmd: list[str], timeout: float = DOCKER_CLI_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def wait_for_output(proc: subprocess.Popen, needle: bytes, deadline: float) -> bool:
    """Reads proc's stdout as it arrives until `needle` shows up. False on EOF or deadline."""
    fd = proc.stdout.fileno()
    tail = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not sel.select(timeout=left):
                return False
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            tail += chunk
            if needle in tail:
                return True
            # Keep just enough to catch a needle split across two reads.
            tail = tail[-len(needle):]


def docker_rm(ids: list[str]) -> None:
    if ids:
        run(["docker", "rm", "-f", *ids], check=False)


def docker_rm_labelled(label: str) -> None:
    found = run(["docker", "ps", "-aq", "--filter", f"label={label}"], check=False).stdout.split()
    docker_rm(found)


# ---------------------------------------------------------------------------- wings process


class Wings:
    """One wings process with its own config, data folder and log, all under `workdir`."""

    def __init__(self, binary: Path, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config_path = workdir / "wings.toml"
        self.log_path = workdir / "wings.log"
        self.client_dir = workdir / "client"
        self.port, self.public_port = free_ports(2)
        self.base = f"https://127.0.0.1:{self.port}"
        # One session per thread: creates run from many threads at once.
        self.local = threading.local()
        self.proc: subprocess.Popen | None = None

    @property
    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = wings_dev.session(self.client_dir)
        return self.local.session

    def start(self) -> None:
        if not (self.data_dir / "pki").exists():
            wings_dev.enroll(self.data_dir, self.client_dir)
        self.config_path.write_text(
            "[api]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f'public_listen = "127.0.0.1:{self.public_port}"\n'
            "[system]\n"
            f'data_dir = "{self.data_dir}"\n'
            "[docker]\n"
            f'network = "{NETWORK}"\n'
        )
        log_file = open(self.log_path, "wb")
        # A session of its own: a Ctrl-C in the terminal must reach only this script, so
        # wings is still up to have its servers deleted through the API during cleanup.
        self.proc = subprocess.Popen(
            [str(self.binary), "--config", str(self.config_path)],
            env={**os.environ, "NO_COLOR": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.perf_counter() + WINGS_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wings exited with {self.proc.returncode} during start (its log follows on stderr)")
            try:
                if self.session.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"wings did not answer /healthz within {WINGS_START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, int]:
        assert self.proc is not None
        return proc_status(self.proc.pid)

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base + path, timeout=HTTP_TIMEOUT)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.session.post(self.base + path, json=body, timeout=HTTP_TIMEOUT)

    def delete(self, path: str) -> requests.Response:
        return self.session.delete(self.base + path, timeout=HTTP_TIMEOUT)

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log("wings ignored SIGTERM for 15 s; killing it")
            self.proc.kill()
            self.proc.wait(timeout=15)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))
            return "\n".join(text.splitlines()[-lines:])
        except OSError:
            return "(no wings log)"


def create_body(blueprint: dict, server_id: str, port: int) -> dict:
    return {
        "id": server_id,
        "blueprint": blueprint,
        "variables": {"FAKE_BOOT_LINES": "0"},
        "allocations": {"default": {"ip": "127.0.0.1", "port": port}, "additional": []},
        "start_on_completion": True,
        "skip_install": True,
    }


def describe_failure(view: dict) -> str:
    extra = f": {view['last_error']}" if view.get("last_error") else ""
    return f"state {view.get('state')}{extra}"


# ---------------------------------------------------------------------------- figure 2: one server


def wings_one(wings: Wings, blueprint: dict, server_id: str) -> tuple[float | None, str | None]:
    """Seconds from sending the create until GET shows "running"; then deletes the server."""
    body = create_body(blueprint, server_id, free_ports(1)[0])
    started = time.perf_counter()
    answer = wings.post("/api/servers", body)
    if answer.status_code != 202:
        return None, f"POST answered {answer.status_code}: {answer.text[:300]}"
    deadline = started + ONE_SERVER_TIMEOUT
    elapsed, error = None, None
    while True:
        view = wings.get(f"/api/servers/{server_id}").json()
        if view["state"] == "running":
            elapsed = time.perf_counter() - started
            break
        if view["state"] == "crashed" or (view["state"] == "offline" and view.get("last_error")):
            error = describe_failure(view)
            break
        if time.perf_counter() > deadline:
            error = f"not running after {ONE_SERVER_TIMEOUT:.0f} s ({describe_failure(view)})"
            break
        time.sleep(POLL_SECONDS)
    gone = wings.delete(f"/api/servers/{server_id}")
    if gone.status_code != 204:
        log(f"DELETE {server_id} answered {gone.status_code}: {gone.text[:200]}")
    return elapsed, error


def baseline_container_args(run_id: str, name: str) -> list[str]:
    return [
        "--name", name,
        "--label", f"{RUN_LABEL}={run_id}",
        "--network", NETWORK,
        "--user", CONTAINER_USER,
        "-e", "FAKE_BOOT_LINES=0",
        IMAGE, GAME_CMD,
    ]


def docker_one(run_id: str, name: str) -> tuple[float | None, str | None]:
    """Seconds from `docker create` until the container prints its ready line; then removes it.

    `docker start -a` attaches before starting, so the ready line is read as it is written,
    which is also how wings learns a game is ready (its own attach stream)."""
    started = time.perf_counter()
    container = None
    try:
        created = run(["docker", "create", *baseline_container_args(run_id, name)], check=False)
        if created.returncode != 0:
            return None, f"docker create failed: {created.stderr.strip()}"
        container = created.stdout.strip()
        attach = subprocess.Popen(["docker", "start", "-a", container], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            ready = wait_for_output(attach, READY, started + ONE_SERVER_TIMEOUT)
            elapsed = time.perf_counter() - started
        finally:
            # SIGKILL ends only the client: unlike SIGTERM it is not forwarded to the container.
            attach.kill()
            attach.wait()
        if not ready:
            return None, f"no ready line within {ONE_SERVER_TIMEOUT:.0f} s"
        return elapsed, None
    finally:
        if container:
            docker_rm([container])


def summarise(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {
        "median": statistics.median(samples),
        "p90": percentile(samples, 90),
        "min": min(samples),
        "max": max(samples),
    }


def measure_latency(wings: Wings, blueprint: dict, run_id: str, iterations: int) -> dict:
    results: dict[str, Any] = {
        "wings": {"samples": [], "failures": []},
        "docker": {"samples": [], "failures": []},
    }
    for i in range(iterations):
        # Alternate so drift on a shared machine hits both sides alike.
        for side in ("wings", "docker"):
            if side == "wings":
                elapsed, error = wings_one(wings, blueprint, f"bench-{run_id}-lat-{i:03d}")
            else:
                elapsed, error = docker_one(run_id, f"{BASELINE_PREFIX}-{run_id}-lat-{i:03d}")
            if error:
                results[side]["failures"].append(error)
                log(f"latency {i + 1}/{iterations} {side}: FAILED ({error})")
            else:
                results[side]["samples"].append(elapsed)
                log(f"latency {i + 1}/{iterations} {side}: {elapsed * 1000:.0f} ms")
    for side in ("wings", "docker"):
        results[side]["summary"] = summarise(results[side]["samples"])
    return results


# ---------------------------------------------------------------------------- figure 3: many servers


def wings_many(wings: Wings, blueprint: dict, run_id: str, count: int) -> dict:
    """Creates `count` servers at once; returns wall time until all run, per-server times and
    failures. Leaves the servers running: the loaded-memory figure is taken right after."""
    ids = [f"bench-{run_id}-many-{i:03d}" for i in range(count)]
    ports = free_ports(count)

    def create(server_id: str, port: int) -> str | None:
        try:
            answer = wings.post("/api/servers", create_body(blueprint, server_id, port))
        except requests.RequestException as e:
            return f"POST failed: {e}"
        return None if answer.status_code == 202 else f"POST answered {answer.status_code}: {answer.text[:300]}"

    failures: dict[str, str] = {}
    accepted: set[str] = set()
    running_at: dict[str, float] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        started = time.perf_counter()
        deadline = started + MANY_SERVERS_TIMEOUT
        pending = {pool.submit(create, sid, port): sid for sid, port in zip(ids, ports)}
        while True:
            for future in [f for f in pending if f.done()]:
                sid = pending.pop(future)
                error = future.result()
                if error:
                    failures[sid] = error
                else:
                    accepted.add(sid)
            if accepted - running_at.keys():
                # One list call per poll instead of one GET per server: lighter on wings.
                views = wings.get("/api/servers").json()
                now = time.perf_counter()
                for view in views:
                    sid = view["id"]
                    if sid in accepted and sid not in running_at and view["state"] == "running":
                        running_at[sid] = now - started
            if not pending and accepted <= running_at.keys():
                break
            if time.perf_counter() > deadline:
                break
            time.sleep(POLL_SECONDS)
    stragglers = accepted - running_at.keys()
    if stragglers:
        views = {v["id"]: v for v in wings.get("/api/servers").json()}
        for sid in sorted(stragglers):
            failures[sid] = f"not running after {MANY_SERVERS_TIMEOUT:.0f} s ({describe_failure(views.get(sid, {}))})"
    times = sorted(running_at.values())
    return {
        "count": count,
        "running": len(running_at),
        "failures": failures,
        "wall_seconds": max(times) if times and not failures else None,
        "last_running_seconds": max(times) if times else None,
        "per_server": summarise(times),
    }


def delete_all_servers(wings: Wings) -> list[str]:
    """Deletes every server wings knows; returns the ids it could not delete."""
    ids = [v["id"] for v in wings.get("/api/servers").json()]

    def one(sid: str) -> str | None:
        try:
            return None if wings.delete(f"/api/servers/{sid}").status_code in (204, 404) else sid
        except requests.RequestException:
            return sid

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return [sid for sid in pool.map(one, ids) if sid]


def docker_many(run_id: str, count: int) -> dict:
    """`count` concurrent `docker run -d`, each followed until its container prints the ready line."""
    def one(i: int, started: float) -> tuple[float | None, str | None, str | None]:
        name = f"{BASELINE_PREFIX}-{run_id}-many-{i:03d}"
        deadline = started + MANY_SERVERS_TIMEOUT
        created = run(["docker", "run", "-d", *baseline_container_args(run_id, name)], check=False)
        if created.returncode != 0:
            return None, f"docker run failed: {created.stderr.strip()}", None
        container = created.stdout.strip()
        follow = subprocess.Popen(["docker", "logs", "-f", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            ready = wait_for_output(follow, READY, deadline)
            done = time.perf_counter() - started
        finally:
            follow.kill()
            follow.wait()
        if not ready:
            return None, f"no ready line within {MANY_SERVERS_TIMEOUT:.0f} s", container
        return done, None, container

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        started = time.perf_counter()
        outcomes = list(pool.map(lambda i: one(i, started), range(count)))
    docker_rm([c for _, _, c in outcomes if c])
    docker_rm_labelled(f"{RUN_LABEL}={run_id}")
    times = sorted(t for t, _, _ in outcomes if t is not None)
    failures = {f"container {i}": e for i, (_, e, _) in enumerate(outcomes) if e}
    return {
        "count": count,
        "running": len(times),
        "failures": failures,
        "wall_seconds": max(times) if times and not failures else None,
        "last_running_seconds": max(times) if times else None,
        "per_server": summarise(times),
    }


# ---------------------------------------------------------------------------- machine facts


def machine_facts(binary: Path) -> dict[str, Any]:
    def first(cmd: list[str]) -> str:
        try:
            result = run(cmd, timeout=30, check=False)
            return (result.stdout or result.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    return {
        "nproc": first(["nproc"]),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "docker": first(["docker", "version", "--format",
                         "server {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}"]),
        "docker_storage": first(["docker", "info", "--format", "{{.Driver}}, cgroup v{{.CgroupVersion}}"]),
        "other_containers_running": len(run(["docker", "ps", "-q"], check=False).stdout.split()),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "wings": first([str(binary), "--version"]),
        "wings_binary": str(binary),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------- report


def mib(kib: int) -> float:
    return kib / 1024


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def secs(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f} s"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "yes" if ok else "**no — misses target**"


def render(results: dict) -> str:
    facts = results["machine"]
    n = results["settings"]["servers"]
    out = [
        "## Wings runtime benchmark",
        "",
        f"Run at {results['started_utc']} UTC. Reproduce from the repository root with:",
        "",
        "```",
        results["command"],
        "```",
        "",
        "### Machine",
        "",
        "| Fact | Value |",
        "|---|---|",
        f"| nproc | {facts['nproc']} |",
        f"| CPU | {facts['cpu_model']} |",
        f"| Memory | {facts['memory_gib']} GiB |",
        f"| Kernel | {facts['kernel']} |",
        f"| Docker | {facts['docker']} |",
        f"| Docker storage / cgroups | {facts['docker_storage']} |",
        f"| Other containers running at start | {facts['other_containers_running']} |",
        f"| Load average at start (1/5/15 min) | {facts['load_average']} |",
        f"| wings | {facts['wings']} (`{facts['wings_binary']}`) |",
        f"| Python | {facts['python']} |",
        "",
    ]
    misses: list[str] = []

    # Figure 1
    out += ["### 1. Resident memory of the wings process", ""]
    memory = results.get("memory")
    if not memory or "idle" not in memory:
        out += ["Not measured (the run stopped before this figure).", ""]
    else:
        idle = mib(memory["idle"]["VmRSS"])
        rows = [
            ("Idle RSS, after /healthz and /api/system", f"{idle:.1f} MiB", PTERODACTYL_IDLE,
             f"≤ {IDLE_TARGET_MIB:.0f} MiB", f"{idle / IDLE_TARGET_MIB:.2f}×", verdict(idle <= IDLE_TARGET_MIB)),
        ]
        if idle > IDLE_TARGET_MIB:
            misses.append(f"idle RSS {idle:.1f} MiB > {IDLE_TARGET_MIB:.0f} MiB")
        loaded = memory.get("loaded")
        if loaded:
            rss = mib(loaded["VmRSS"])
            hwm = mib(loaded["VmHWM"])
            label = f"RSS with {loaded['servers_running']} running servers"
            ok = rss <= LOADED_TARGET_MIB and loaded["servers_running"] == n
            rows.append((label, f"{rss:.1f} MiB", "—", f"≤ {LOADED_TARGET_MIB:.0f} MiB",
                         f"{rss / LOADED_TARGET_MIB:.2f}×", verdict(ok)))
            rows.append(("Peak RSS (VmHWM) up to then", f"{hwm:.1f} MiB", "—", "— (reported only)", "—", "—"))
            if not ok:
                misses.append(f"RSS with {loaded['servers_running']}/{n} running servers {rss:.1f} MiB"
                              f" (target ≤ {LOADED_TARGET_MIB:.0f} MiB with {n})")
        else:
            rows.append((f"RSS with {n} running servers", "not measured", "—", f"≤ {LOADED_TARGET_MIB:.0f} MiB", "—",
                         verdict(None)))
        after = memory.get("after_delete")
        if after:
            rows.append(("RSS after deleting them all", f"{mib(after['VmRSS']):.1f} MiB", "—", "— (reported only)", "—", "—"))
        out += [
            "| Measurement | Measured | Baseline | Target | Ratio (measured / target) | Meets target |",
            "|---|---|---|---|---|---|",
            *[f"| {' | '.join(r)} |" for r in rows],
            "",
            f"Threads in wings: {memory['idle'].get('Threads', '?')} idle"
            + (f", {loaded.get('Threads', '?')} with the servers running." if loaded else "."),
            "",
        ]

    # Figure 2
    iterations = results["settings"]["iterations"]
    out += [f"### 2. Create-to-running latency, one server ({iterations} iterations each, alternating)", ""]
    latency = results.get("latency")
    if not latency:
        out += ["Not measured (the run stopped before this figure).", ""]
    else:
        w, d = latency["wings"], latency["docker"]
        out += [
            "| Path | Median | p90 | Min | Max | Failures |",
            "|---|---|---|---|---|---|",
        ]
        for name, side in (("wings: POST /api/servers → state running", w),
                           ("baseline: docker create + docker start → ready line", d)):
            s = side["summary"] or {}
            out.append(f"| {name} | {ms(s.get('median'))} | {ms(s.get('p90'))} | {ms(s.get('min'))} | "
                       f"{ms(s.get('max'))} | {len(side['failures'])} |")
        out.append("")
        if w["summary"] and d["summary"]:
            out += ["| Ratio wings / docker | Measured | Target | Meets target |", "|---|---|---|---|"]
            for key in ("median", "p90"):
                ratio = w["summary"][key] / d["summary"][key]
                ok = ratio <= LATENCY_RATIO_TARGET
                out.append(f"| {key} | {ratio:.2f}× | ≤ {LATENCY_RATIO_TARGET}× | {verdict(ok)} |")
                if not ok:
                    misses.append(f"create-to-running {key} ratio {ratio:.2f}× > {LATENCY_RATIO_TARGET}×")
            out.append("")
        if w["failures"] or d["failures"]:
            misses.append(f"create-to-running had {len(w['failures'])} wings and {len(d['failures'])} docker failures")
            out += ["Failures:", ""]
            out += [f"- {side}: {err}" for side, fs in (("wings", w["failures"]), ("docker", d["failures"])) for err in fs]
            out.append("")
        out += [f"Samples (ms), in run order — wings: {', '.join(f'{x * 1000:.0f}' for x in w['samples'])}; "
                f"docker: {', '.join(f'{x * 1000:.0f}' for x in d['samples'])}.", ""]

    # Figure 3
    out += [f"### 3. {n} servers started at once", ""]
    many = results.get("many")
    if not many or "wings" not in many:
        out += ["Not measured (the run stopped before this figure).", ""]
    else:
        w, d = many["wings"], many.get("docker")
        out += [
            "| Path | Wall time until all run | Running | Failures | Per-server median | Per-server p90 |",
            "|---|---|---|---|---|---|",
        ]
        for name, side in ((f"wings: {n} concurrent POST /api/servers", w),
                           (f"baseline: {n} concurrent docker run -d", d)):
            if not side:
                out.append(f"| {name} | not measured | — | — | — | — |")
                continue
            s = side["per_server"] or {}
            wall = secs(side["wall_seconds"]) if side["wall_seconds"] is not None else \
                f"incomplete (last success at {secs(side['last_running_seconds'])})"
            out.append(f"| {name} | {wall} | {side['running']}/{side['count']} | {len(side['failures'])} | "
                       f"{secs(s.get('median'))} | {secs(s.get('p90'))} |")
        out.append("")
        if d and w["wall_seconds"] and d["wall_seconds"]:
            out += [f"Ratio wings / docker (wall time): **{w['wall_seconds'] / d['wall_seconds']:.2f}×** "
                    "(no target was set for this figure).", ""]
        for name, side in (("wings", w), ("docker", d)):
            if side and side["failures"]:
                misses.append(f"{len(side['failures'])} of {n} {name} servers failed to start")
                out += [f"{name} failures:", ""] + [f"- {k}: {v}" for k, v in sorted(side["failures"].items())] + [""]

    if results.get("error"):
        out += ["### Run error", "", "```", results["error"], "```", ""]

    out += ["### Verdict", ""]
    if misses:
        out += [f"- Misses: {m}" for m in misses]
    elif not results.get("error"):
        out.append("- Every figure with a target met it.")
    if results.get("error"):
        out.append("- The run did not finish; figures above marked \"not measured\" are missing.")
    out += [
        "",
        "### Method notes",
        "",
        "- Memory is VmRSS / VmHWM from `/proc/<wings pid>/status`, in MiB (1 MiB = 1024 KiB). The loaded "
        f"figure is sampled as soon as all {n} servers of figure 3 report running, so VmHWM includes that "
        "burst and the figure-2 iterations before it. The Pterodactyl figure is quoted, not measured.",
        "- wings latency is polled with `GET /api/servers/{id}` every 20 ms, so it carries up to 20 ms of "
        "polling delay; the docker baseline reads the ready line from `docker start -a` as it is written, "
        "with no polling delay. Percentiles are nearest-rank.",
        "- The baseline container is a bare one (same image, user, network "
        "and `FAKE_BOOT_LINES=0`). wings' container additionally publishes the game port on 127.0.0.1, sets "
        "memory/CPU/pids limits, a read-only root with a `/tmp` tmpfs, bind-mounts the server folder, drops "
        "all capabilities and keeps stdin open; wings also checks the image and port and writes its state "
        "files before creating it.",
        "- In figure 3, wings' servers are polled with one `GET /api/servers` every 20 ms; each baseline "
        "container is followed with `docker logs -f`. Wall time runs from the first request to the last "
        "server seen running. A server that is not running within 180 s counts as a failure.",
        "- Order: idle memory, figure 2 (alternating wings/docker), figure 3 wings (then the loaded memory "
        "sample and deletion of its servers), figure 3 docker.",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def ensure_image() -> None:
    if run(["docker", "image", "inspect", IMAGE], check=False).returncode == 0:
        return
    log(f"{IMAGE} is missing; building it with scripts/images.sh testbox")
    subprocess.run(["bash", str(REPO / "scripts" / "images.sh"), "testbox"], check=True, stdout=sys.stderr)


def network_exists() -> bool:
    return run(["docker", "network", "inspect", NETWORK], check=False).returncode == 0


def cleanup(wings: Wings | None, run_id: str, workdir: Path, network_was_there: bool) -> None:
    log("cleaning up")
    if wings is not None:
        if wings.alive():
            try:
                left = delete_all_servers(wings)
                if left:
                    log(f"could not delete through the API: {', '.join(left)}")
            except (requests.RequestException, ValueError) as e:
                log(f"listing servers for cleanup failed: {e}")
            wings.stop()
        # wings leaves game containers running when it stops; remove anything still labelled
        # with this run's data folder (for example after a failed API delete).
        docker_rm_labelled(f"mamba.data-dir={wings.data_dir}")
    docker_rm_labelled(f"{RUN_LABEL}={run_id}")
    shutil.rmtree(workdir, ignore_errors=True)
    if not network_was_there and network_exists():
        if run(["docker", "network", "rm", NETWORK], check=False).returncode != 0:
            log(f"left the network {NETWORK} in place (still in use)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wings", type=Path, default=DEFAULT_WINGS, help=f"wings binary (default {DEFAULT_WINGS})")
    parser.add_argument("--iterations", type=int, default=10, help="create-to-running iterations per side (default 10)")
    parser.add_argument("--servers", type=int, default=50, help="servers for the loaded-memory and at-once figures (default 50)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    args = parser.parse_args()
    if args.iterations < 1 or args.servers < 1:
        parser.error("--iterations and --servers must be at least 1")

    binary = args.wings.resolve()
    if not os.access(binary, os.X_OK):
        print(f"error: no wings binary at {binary}; build it with "
              "`CARGO_TARGET_DIR=/work/target cargo build --release -p mamba-wings` or pass --wings",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        log("warning: not running as root; wings needs root to chown server folders")
    ensure_image()
    blueprint = yaml.safe_load(BLUEPRINT.read_text())

    # SIGTERM becomes SystemExit so the finally block below still cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    run_id = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix=f"mamba-wings-bench-{run_id}-"))
    results: dict[str, Any] = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join([*shlex.split(REPRODUCE), *sys.argv[1:]]),
        "settings": {"iterations": args.iterations, "servers": args.servers, "poll_seconds": POLL_SECONDS},
        "machine": machine_facts(binary),
        "memory": {},
        "many": {},
    }
    network_was_there = network_exists()
    wings = None
    status = 0
    try:
        wings = Wings(binary, workdir)
        log(f"starting {binary} on port {wings.port}, data in {wings.data_dir}")
        wings.start()
        wings.get("/api/system").raise_for_status()
        results["memory"]["idle"] = wings.status()
        log(f"idle RSS {mib(results['memory']['idle']['VmRSS']):.1f} MiB")

        results["latency"] = measure_latency(wings, blueprint, run_id, args.iterations)

        log(f"creating {args.servers} servers at once through wings")
        results["many"]["wings"] = wings_many(wings, blueprint, run_id, args.servers)
        loaded = wings.status()
        loaded["servers_running"] = results["many"]["wings"]["running"]
        results["memory"]["loaded"] = loaded
        log(f"{loaded['servers_running']} running; RSS {mib(loaded['VmRSS']):.1f} MiB, peak {mib(loaded['VmHWM']):.1f} MiB")
        left = delete_all_servers(wings)
        if left:
            raise RuntimeError(f"could not delete servers {', '.join(left)}")
        results["memory"]["after_delete"] = wings.status()

        log(f"starting {args.servers} containers at once with docker run")
        results["many"]["docker"] = docker_many(run_id, args.servers)
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # report what was measured, then clean up
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            results["error"] = "interrupted"
        else:
            results["error"] = f"{type(e).__name__}: {e}"
        log(f"run failed: {results['error']}")
        if wings is not None:
            log(f"last lines of the wings log:\n{wings.log_tail()}")
        status = 1
    finally:
        cleanup(wings, run_id, workdir, network_was_there)

    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"raw numbers written to {args.json}")
    measured_failures = bool(results.get("latency", {}).get("wings", {}).get("failures")) or any(
        side.get("failures") for side in results["many"].values()
    )
    return status or (1 if measured_failures else 0)


if __name__ == "__main__":
    sys.exit(main())
