#!/usr/bin/env python3
"""Prepares the main job's panel through its own REST API: logs in as the first super-admin,
makes sure a demo tenant and a local node (with a port pool) exist, and, while the node is not
enrolled yet, asks for an enrollment token.

Usage: demo_setup.py PANEL_URL ADMIN_FILE STATE_FILE
  ADMIN_FILE  what `panel admin create-user` printed (email and password lines)
  STATE_FILE  JSON written here: {"tenant", "node", "enrollment_command"?}
Env: MAMBA_WINGS_PORT, MAMBA_WINGS_PUBLIC_PORT, MAMBA_SFTP_PORT, MAMBA_DEMO_PORTS (e.g. 5556-5600)

Only the standard library: it runs before anything else is installed.
"""
import json
import os
import sys
import urllib.error
import urllib.request


def call(base, method, path, token=None, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"message": text.decode(errors="replace")}


def must(status_body, *ok):
    status, body = status_body
    if status not in ok:
        sys.exit(f"demo_setup: unexpected answer {status}: {json.dumps(body)}")
    return body


def main():
    base, admin_file, state_file = sys.argv[1:4]
    creds = {}
    with open(admin_file) as f:
        for line in f:
            key, _, value = line.partition(":")
            creds[key.strip()] = value.strip()
    login = must(
        call(base, "POST", "/api/v1/auth/login",
             body={"email": creds["email"], "password": creds["password"], "client": "api"}),
        200,
    )
    token = login["tokens"]["access_token"]

    tenants = must(call(base, "GET", "/api/v1/tenants?limit=100", token), 200)
    tenant = next((t for t in tenants["items"] if t["slug"] == "demo"), None)
    if tenant is None:
        tenant = must(call(base, "POST", "/api/v1/tenants", token, {"slug": "demo", "name": "Demo"}), 201)

    wings_port = int(os.environ.get("MAMBA_WINGS_PORT", "8080"))
    public_port = int(os.environ.get("MAMBA_WINGS_PUBLIC_PORT", "8081"))
    sftp_port = int(os.environ.get("MAMBA_SFTP_PORT", "2022"))
    nodes = must(call(base, "GET", "/api/v1/admin/nodes?limit=100", token), 200)
    node = next((n for n in nodes["items"] if n["name"] == "local"), None)
    if node is None:
        node = must(call(base, "POST", "/api/v1/admin/nodes", token, {
            "name": "local", "fqdn": "127.0.0.1", "location": "local",
            "cpu_percent": 100 * (os.cpu_count() or 1), "memory_mb": 8192, "disk_mb": 51200,
            "overallocation_percent": 0,
            "api_port": wings_port, "public_url": f"http://127.0.0.1:{public_port}", "sftp_port": sftp_port,
        }), 201)
        must(call(base, "POST", f"/api/v1/admin/nodes/{node['id']}/pools", token, {
            "ips": ["0.0.0.0"], "ports": [os.environ.get("MAMBA_DEMO_PORTS", "5556-5600")],
        }), 201)

    state = {"tenant": tenant["id"], "node": node["id"]}
    if os.environ.get("MAMBA_ENROLLED") != "1":
        created = must(call(base, "POST", f"/api/v1/admin/nodes/{node['id']}/enrollment-token", token, {}), 200, 201)
        state["enrollment_token"] = created["token"]
        state["panel_node_url"] = created["panel_url"]
    with open(state_file, "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    main()
