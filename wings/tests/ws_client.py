#!/usr/bin/env python3
"""A console-socket client outside the Rust test process, built on the `websockets` package.

Usage: ws_client.py script SCENARIO.json   run steps against one socket; exit 1 on failure
       ws_client.py flood  SCENARIO.json   many sockets on one server, one of which never reads
       ws_client.py many   SCENARIO.json   open N sockets at once; report each one's close code

Every wait has a timeout; the transcript of received events is printed on failure.

Script steps (a JSON object with "url", "http" {"base", "cert", "key", "ca"} and "steps"):
  {"send": {"event": ..., "args": [...]}}          send one message
  {"send_raw": "text", "repeat": N}                 send raw text frames
  {"expect": MATCH, "timeout": s}                   wait for a matching event (others are kept)
  {"expect_sequence": [MATCH, ...], "timeout": s}   the matches arrive in this order
  {"expect_none": MATCH, "for": s}                  no matching event arrives for s seconds
  {"expect_close": code, "timeout": s}              the server closes with this code
  {"http": {"method", "path", "body"}, "status": n} call wings' HTTP API as the panel (mutual TLS)
  {"reconnect": true}                               open a fresh socket (same url)
MATCH: {"event": name, "arg": exact first arg, "contains": substring of first arg,
        "json": {key: value} subset of the first arg parsed as JSON}
"""

import asyncio
import json
import socket
import ssl
import sys
import time
import urllib.parse
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def matches(message, want):
    if message.get("event") != want.get("event"):
        return False
    args = message.get("args") or []
    first = args[0] if args else None
    if "arg" in want and first != want["arg"]:
        return False
    if "contains" in want and not (isinstance(first, str) and want["contains"] in first):
        return False
    if "json" in want:
        if isinstance(first, dict):
            parsed = first
        else:
            try:
                parsed = json.loads(first)
            except (TypeError, ValueError):
                return False
        for key, value in want["json"].items():
            if parsed.get(key) != value:
                return False
    return True


class Failure(Exception):
    pass


class Session:
    def __init__(self, url):
        self.url = url
        self.ws = None
        self.seen = []  # every event received, for the transcript
        self.pending = []  # received but not yet matched
        self.close_code = None

    async def open(self):
        self.ws = await connect(self.url, max_size=None, open_timeout=10)
        self.pending = []
        self.close_code = None

    async def receive(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        try:
            raw = await asyncio.wait_for(self.ws.recv(), left)
        except ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd else None
            raise
        message = json.loads(raw)
        self.seen.append(message)
        self.pending.append(message)

    async def expect(self, want, timeout):
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.pending):
                if matches(message, want):
                    del self.pending[: i + 1]
                    return message
            try:
                await self.receive(deadline)
            except asyncio.TimeoutError:
                raise Failure(f"timed out after {timeout}s waiting for {want}")
            except ConnectionClosed:
                raise Failure(f"closed ({self.close_code}) while waiting for {want}")

    async def expect_none(self, want, seconds):
        deadline = time.monotonic() + seconds
        while True:
            for message in self.pending:
                if matches(message, want):
                    raise Failure(f"unexpected {message}")
            try:
                await self.receive(deadline)
            except asyncio.TimeoutError:
                return
            except ConnectionClosed:
                raise Failure(f"closed ({self.close_code}) while checking that {want} does not arrive")

    async def expect_close(self, code, timeout):
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while True:
            try:
                await self.receive(deadline)
            except asyncio.TimeoutError:
                raise Failure(f"not closed within {timeout}s (wanted code {code})")
            except ConnectionClosed:
                if self.close_code != code:
                    raise Failure(f"closed with {self.close_code}, wanted {code}")
                return time.monotonic() - started


def panel_tls(config):
    """The panel's side of wings' mutual TLS: its certificate, and only the node's CA.

    The node's certificate names it by a URI (urn:mamba:node:<id>), not by a host name, so
    the chain is verified but the host name is not.
    """
    context = ssl.create_default_context(cafile=config["ca"])
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(config["cert"], config["key"])
    return context


def http_call(config, call):
    body = call.get("body")
    request = urllib.request.Request(
        config["base"] + call["path"],
        method=call.get("method", "POST"),
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=panel_tls(config)) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def run_script(scenario):
    session = Session(scenario["url"])
    await session.open()
    try:
        for number, step in enumerate(scenario["steps"]):
            try:
                await run_step(session, scenario, step)
            except Failure as failure:
                raise Failure(f"step {number} {json.dumps(step)}: {failure}")
    except Failure as failure:
        print("FAIL:", failure)
        print("transcript:")
        for message in session.seen[-60:]:
            print("  ", json.dumps(message)[:300])
        return 1
    finally:
        if session.ws is not None:
            await session.ws.close()
    if scenario.get("dump"):
        for message in session.seen:
            print("EVENT", json.dumps(message))
    print(f"ok: {len(scenario['steps'])} steps, {len(session.seen)} events")
    return 0


async def run_step(session, scenario, step):
    timeout = step.get("timeout", 30)
    if "send" in step:
        await session.ws.send(json.dumps(step["send"]))
    elif "send_raw" in step:
        for _ in range(step.get("repeat", 1)):
            try:
                await session.ws.send(step["send_raw"])
            except ConnectionClosed:
                break
    elif "expect" in step:
        await session.expect(step["expect"], timeout)
    elif "expect_sequence" in step:
        for want in step["expect_sequence"]:
            await session.expect(want, timeout)
    elif "expect_none" in step:
        await session.expect_none(step["expect_none"], step["for"])
    elif "expect_close" in step:
        took = await session.expect_close(step["expect_close"], timeout)
        print(f"closed with {step['expect_close']} after {took:.3f}s")
    elif "http" in step:
        status = http_call(scenario["http"], step["http"])
        if status != step.get("status", 204):
            raise Failure(f"HTTP {status}")
    elif "reconnect" in step:
        await session.ws.close()
        await session.open()
    else:
        raise Failure("unknown step")


async def run_flood(scenario):
    """Opens `clients` sockets; the first never reads after authenticating. The others read
    everything for `seconds` while the game floods, then the script reports what each got."""
    url, token, clients, seconds = scenario["url"], scenario["token"], scenario["clients"], scenario["seconds"]
    auth = json.dumps({"event": "auth", "args": [token]})
    sockets = []
    for i in range(clients):
        # The stalled client has a tiny receive buffer and queue, so wings feels it at once.
        sock = None
        if i == 0:
            host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, port))
        ws = await connect(url, sock=sock, max_size=None, max_queue=1 if i == 0 else 1024, open_timeout=10)
        await ws.send(auth)
        sockets.append(ws)
    # late_lines: lines received in the last three seconds, to show a client kept receiving.
    counts = [{"lines": 0, "late_lines": 0, "throttled": 0, "throttled_events": 0} for _ in range(clients)]

    async def reader(i, ws):
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                raw = await asyncio.wait_for(ws.recv(), left)
            except (asyncio.TimeoutError, ConnectionClosed):
                return
            message = json.loads(raw)
            if message["event"] == "console output":
                counts[i]["lines"] += 1
                if deadline - time.monotonic() < 3:
                    counts[i]["late_lines"] += 1
            elif message["event"] == "throttled":
                counts[i]["throttled"] += int(message["args"][0])
                counts[i]["throttled_events"] += 1

    await asyncio.sleep(0)  # let the auth messages go out
    if "http" in scenario:
        for call in scenario["http"]["calls"]:
            status = http_call(scenario["http"], call)
            if status >= 300:
                print("FAIL: HTTP", status, call)
                return 1
    await asyncio.gather(*(reader(i, ws) for i, ws in enumerate(sockets) if i != 0))
    # Now drain the stalled client: it must learn how much it missed.
    stalled = sockets[0]
    drain_until = time.monotonic() + 10
    while time.monotonic() < drain_until and counts[0]["throttled"] == 0:
        try:
            message = json.loads(await asyncio.wait_for(stalled.recv(), drain_until - time.monotonic()))
        except (asyncio.TimeoutError, ConnectionClosed):
            break
        if message["event"] == "console output":
            counts[0]["lines"] += 1
        elif message["event"] == "throttled":
            counts[0]["throttled"] += int(message["args"][0])
            counts[0]["throttled_events"] += 1
    for ws in sockets:
        await ws.close()
    print(json.dumps({"clients": counts}))
    return 0


async def run_many(scenario):
    """Opens `clients` sockets, authenticates each, and reports how each one was closed
    (null: still open after `seconds`)."""
    auth = json.dumps({"event": "auth", "args": [scenario["token"]]})
    sockets = []
    for _ in range(scenario["clients"]):
        ws = await connect(scenario["url"], open_timeout=10)
        try:
            await ws.send(auth)
        except ConnectionClosed:
            pass
        sockets.append(ws)

    async def outcome(ws):
        deadline = time.monotonic() + scenario["seconds"]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(ws.recv(), left)
            except asyncio.TimeoutError:
                return None
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1

    codes = await asyncio.gather(*(outcome(ws) for ws in sockets))
    for ws in sockets:
        await ws.close()
    print(json.dumps({"close_codes": codes}))
    return 0


def main():
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        scenario = json.load(f)
    runner = {"script": run_script, "flood": run_flood, "many": run_many}[mode]
    sys.exit(asyncio.run(runner(scenario)))


if __name__ == "__main__":
    main()
