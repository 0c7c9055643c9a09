#!/usr/bin/env python3
"""A real SFTP client (paramiko) in another process, driven by wings/tests/sftp.rs.

    sftp_client.py PORT LOGIN [--password P] [--key FILE] ACTION [ARGS]

Actions (each prints one JSON line per result):
  login              log in and open the sftp subsystem: {"ok": true} or {"ok": false, "error"}
  attempts N         N password attempts on one connection each: {"results": [true|false, ...]}
  channel KIND       after login, ask for a shell or exec: {"ok": bool}
  hold               log in, open sftp, print {"ready": true}, then wait until wings closes the
                     session: {"closed": true}
  ops JSON           log in, run a list of operations, print one result per operation
"""

import json
import socket
import sys
import time

import paramiko


def emit(value):
    print(json.dumps(value), flush=True)


def connect(port, login, password, key):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = 30
    transport.auth_timeout = 30
    transport.start_client(timeout=30)
    if key:
        pkey = paramiko.Ed25519Key.from_private_key_file(key)
        transport.auth_publickey(login, pkey)
    else:
        transport.auth_password(login, password)
    return transport


def error_text(e):
    return f"{type(e).__name__}: {e}"


def run_op(sftp, op):
    """One operation: {"op": name, ...} -> {"ok": bool, ...}."""
    name = op["op"]
    try:
        if name == "put":
            # Not pipelined: paramiko drops the errors of pipelined writes at close.
            with sftp.open(op["path"], "wb") as f:
                data = op.get("data", "").encode()
                data *= op.get("repeat", 1)
                f.write(data)
            return {"ok": True}
        if name == "append":
            with sftp.open(op["path"], "ab") as f:
                f.write(op["data"].encode())
            return {"ok": True}
        if name == "get":
            with sftp.open(op["path"], "rb") as f:
                return {"ok": True, "data": f.read().decode(errors="replace")}
        if name == "list":
            entries = sftp.listdir_attr(op["path"])
            return {"ok": True, "names": sorted(e.filename for e in entries)}
        if name == "stat":
            st = sftp.stat(op["path"])
            return {"ok": True, "size": st.st_size, "mode": st.st_mode}
        if name == "lstat":
            st = sftp.lstat(op["path"])
            return {"ok": True, "size": st.st_size, "mode": st.st_mode}
        if name == "mkdir":
            sftp.mkdir(op["path"])
            return {"ok": True}
        if name == "rmdir":
            sftp.rmdir(op["path"])
            return {"ok": True}
        if name == "remove":
            sftp.remove(op["path"])
            return {"ok": True}
        if name == "rename":
            sftp.rename(op["from"], op["to"])
            return {"ok": True}
        if name == "symlink":
            sftp.symlink(op["target"], op["path"])
            return {"ok": True}
        if name == "readlink":
            return {"ok": True, "target": sftp.readlink(op["path"])}
        if name == "chmod":
            sftp.chmod(op["path"], op["mode"])
            return {"ok": True}
        if name == "truncate":
            sftp.truncate(op["path"], op["size"])
            return {"ok": True}
        if name == "realpath":
            return {"ok": True, "path": sftp.normalize(op["path"])}
        return {"ok": False, "error": f"unknown op {name}"}
    except (IOError, OSError, paramiko.SSHException) as e:
        return {"ok": False, "error": error_text(e)}


def main():
    args = sys.argv[1:]
    port, login = int(args[0]), args[1]
    args = args[2:]
    password = key = None
    while args and args[0].startswith("--"):
        if args[0] == "--password":
            password = args[1]
        elif args[0] == "--key":
            key = args[1]
        args = args[2:]
    action = args[0]

    if action == "attempts":
        results = []
        for _ in range(int(args[1])):
            try:
                connect(port, login, password, key).close()
                results.append(True)
            except (paramiko.SSHException, OSError, EOFError):
                results.append(False)
        emit({"results": results})
        return

    try:
        transport = connect(port, login, password, key)
    except (paramiko.SSHException, OSError, EOFError) as e:
        emit({"ok": False, "error": error_text(e)})
        return

    if action == "login":
        try:
            paramiko.SFTPClient.from_transport(transport).close()
            emit({"ok": True})
        except (paramiko.SSHException, OSError, EOFError) as e:
            emit({"ok": False, "error": error_text(e)})
    elif action == "channel":
        channel = transport.open_session(timeout=30)
        try:
            if args[1] == "shell":
                channel.invoke_shell()
            else:
                channel.exec_command("id")
            emit({"ok": True})
        except paramiko.SSHException as e:
            emit({"ok": False, "error": error_text(e)})
    elif action == "hold":
        sftp = paramiko.SFTPClient.from_transport(transport)
        emit({"ready": True})
        # Reads "ping" lines from stdin in a thread: each answers whether the session still works.
        import threading

        def pings():
            for line in sys.stdin:
                if line.strip() == "ping":
                    try:
                        sftp.stat(".")
                        emit({"alive": transport.is_active(), "sftp": True})
                    except (IOError, OSError, paramiko.SSHException):
                        transport.global_request("keepalive@openssh.com", wait=True)
                        emit({"alive": transport.is_active(), "sftp": False})

        threading.Thread(target=pings, daemon=True).start()
        deadline = time.monotonic() + 120
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        emit({"closed": not transport.is_active()})
    elif action == "ops":
        sftp = paramiko.SFTPClient.from_transport(transport)
        for op in json.loads(args[1]):
            emit(run_op(sftp, op))
    transport.close()


if __name__ == "__main__":
    main()
