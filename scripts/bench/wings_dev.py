#!/usr/bin/env python3
"""Runs a benchmark's wings without a panel: enrolls its data folder with a throwaway CA and
calls its API as the panel, over mutual TLS.

wings serves the panel's API only over mutual TLS to a certificate from the CA it enrolled
with (ADR 0009). The `dev_enroll` example (not part of the wings binary) makes a CA, writes
the node's identity into the data folder as `wings enroll` would, and hands out the panel's
client certificate; its CA key is thrown away. Build it next to the release wings:

    cargo build --release -p mamba-wings --bin wings --example dev_enroll

As a library: `enroll(data_dir, client_dir)`, then `ssl_context(client_dir)` for urllib or
`session(client_dir)` for requests. From a shell:

    python3 scripts/bench/wings_dev.py enroll DATA_DIR CLIENT_DIR
    python3 scripts/bench/wings_dev.py call CLIENT_DIR METHOD URL [JSON_BODY_FILE]

`call` prints the answer's body and fails (exit 1) on a status of 400 or more.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "mamba" / "target"))
DEV_ENROLL = TARGET / "release" / "examples" / "dev_enroll"


def enroll(data_dir: Path, client_dir: Path, binary: Path = DEV_ENROLL) -> None:
    if not os.access(binary, os.X_OK):
        raise SystemExit(
            f"no dev_enroll at {binary} (cargo build --release -p mamba-wings --example dev_enroll)"
        )
    subprocess.run([str(binary), str(data_dir), str(client_dir)], check=True)


def ssl_context(client_dir: Path) -> ssl.SSLContext:
    """The panel's side: its certificate, and trust in the throwaway CA only.

    The node's certificate names it by a URI (urn:mamba:node:<id>), not a host name, so the
    chain is verified and the host name is not."""
    context = ssl.create_default_context(cafile=str(client_dir / "ca.crt"))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(client_dir / "panel.crt"), str(client_dir / "panel.key"))
    return context


def session(client_dir: Path):
    """A requests.Session that talks to wings as the panel."""
    import requests
    from requests.adapters import HTTPAdapter

    context = ssl_context(client_dir)

    class PanelAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = context
            # urllib3 would match the host name itself when the context does not.
            kwargs["assert_hostname"] = False
            super().init_poolmanager(*args, **kwargs)

    s = requests.Session()
    # Our CA only (requests would otherwise add its public bundle to the context).
    s.verify = str(client_dir / "ca.crt")
    s.mount("https://", PanelAdapter(pool_maxsize=64))
    return s


def call(client_dir: Path, method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=300, context=ssl_context(client_dir)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "enroll":
        enroll(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) in (4, 5) and argv[0] == "call":
        body = Path(argv[4]).read_bytes() if len(argv) == 5 else None
        status, answer = call(Path(argv[1]), argv[2], argv[3], body)
        sys.stdout.buffer.write(answer)
        return 0 if status < 400 else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
