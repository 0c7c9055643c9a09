#!/usr/bin/env python3
"""Panel API figures for docs/BENCHMARKS.md, measured side by side in one run.

For SQLite and PostgreSQL: requests per second (wrk) of an authenticated GET
/api/v1/users/me and of a tenant-scoped list route, against the unauthenticated /healthz
of the same server (the framework's own ceiling here); p99 latency at a fixed rate; and
the cost of a login with the default argon2 parameters.

Needs wrk, a release build of `panel`, and MAMBA_TEST_POSTGRES_URL (scripts/panel-services.sh).
"""

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

PORT = 18190


def http(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def wait_ready(base, proc):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("panel exited early")
        try:
            urllib.request.urlopen(base + "/readyz", timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("panel did not become ready")


def wrk(url, token, duration, connections, rate=None):
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    script = None
    if token:
        args += ["-H", f"Authorization: Bearer {token}"]
    if rate:
        # wrk is closed-loop; a per-request delay caps each connection so that all of them
        # together offer about `rate` requests a second.
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write(f"function delay() return {1000.0 * connections / rate:.3f} end\n")
        script.close()
        args += ["-s", script.name]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    if script:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99.group(1)) * scale, int(non2xx.group(1)) if non2xx else 0


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def bench_backend(binary, name, database_url, args):
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        PANEL_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        PANEL_HTTP__LISTEN=f"127.0.0.1:{PORT}",
        PANEL_HTTP__WORKERS="2",
        RUST_LOG="warn",
    )
    created = subprocess.run([binary, "admin", "create-user", "--email", "bench@example.test"],
                             env=env, capture_output=True, text=True, check=True).stdout
    password = re.search(r"password: (\S+)", created).group(1)
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{PORT}"
    try:
        wait_ready(base, proc)
        # Login cost with the default argon2id parameters, one at a time.
        times = []
        for _ in range(args.logins):
            t0 = time.perf_counter()
            answer = http("POST", base + "/api/v1/auth/login",
                          {"email": "bench@example.test", "password": password, "client": "api"})
            times.append((time.perf_counter() - t0) * 1000)
        token = answer["tokens"]["access_token"]
        rss_before_parallel = rss_kib(proc.pid)
        tenant = http("POST", base + "/api/v1/tenants", {"slug": "bench", "name": "Bench"}, token)["id"]
        for i in range(20):
            http("POST", base + f"/api/v1/tenants/{tenant}/invitations",
                 {"email": f"invitee{i}@example.test", "role": "MEMBER"}, token)
        routes = [
            ("GET /healthz (no auth, no database)", base + "/healthz", None),
            ("GET /api/v1/users/me (access token)", base + "/api/v1/users/me", token),
            ("GET /api/v1/tenants/{t}/invitations (20 rows)", base + f"/api/v1/tenants/{tenant}/invitations", token),
        ]
        rows = []
        for label, url, tok in routes:
            rps, p99, bad = wrk(url, tok, args.duration, args.connections)
            fixed_rps, p99_fixed, bad_fixed = wrk(url, tok, args.duration, 50, rate=args.rate)
            rows.append((label, rps, p99, p99_fixed, fixed_rps, bad + bad_fixed))
        peak = rss_kib(proc.pid, "VmHWM")
        return {
            "name": name,
            "logins_ms": sorted(times),
            "rows": rows,
            "rss_idle_kib": rss_before_parallel,
            "peak_kib": peak,
        }
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "panel"))
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--logins", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    admin = os.environ.get("MAMBA_TEST_POSTGRES_URL")
    if not admin:
        sys.exit("MAMBA_TEST_POSTGRES_URL is not set: source scripts/panel-services.sh")
    results = []
    with tempfile.TemporaryDirectory() as d:
        results.append(bench_backend(args.binary, "SQLite", f"sqlite://{d}/panel.db", args))
    db = f"mamba_bench_{uuid.uuid4().hex}"
    subprocess.run(["psql", admin, "-qc", f'CREATE DATABASE "{db}"'], check=True)
    try:
        results.append(bench_backend(args.binary, "PostgreSQL", admin.rsplit("/", 1)[0] + "/" + db, args))
    finally:
        subprocess.run(["psql", admin, "-qc", f'DROP DATABASE "{db}" WITH (FORCE)'], check=True)

    print(f"Run at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
          f"load average at the end {open('/proc/loadavg').read().split()[:3]}; "
          f"wrk -t2 -c{args.connections} -d{args.duration}s; fixed rate {args.rate}/s offered over 50 connections.\n")
    print("| Backend | Route | Requests/s | vs /healthz | p99 at full load | p99 at fixed rate | achieved fixed rate | non-2xx |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ceiling = r["rows"][0][1]
        for label, rps, p99, p99_fixed, fixed_rps, bad in r["rows"]:
            print(f"| {r['name']} | {label} | {rps:,.0f} | {rps / ceiling:.2f}x | {p99:.2f} ms | {p99_fixed:.2f} ms | "
                  f"{fixed_rps:,.0f}/s | {bad} |")
    print()
    print("| Backend | Login (argon2id 19 MiB, 2 passes) median | min | max | panel RSS after logins | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t = r["logins_ms"]
        print(f"| {r['name']} | {t[len(t) // 2]:.1f} ms | {t[0]:.1f} ms | {t[-1]:.1f} ms | "
              f"{r['rss_idle_kib'] / 1024:.1f} MiB | {r['peak_kib'] / 1024:.1f} MiB |")


if __name__ == "__main__":
    main()
