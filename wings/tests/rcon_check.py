#!/usr/bin/env python3
"""Checks the test RCON game server with an independent client, the `rcon` package from PyPI:
login, a one-packet answer, a multi-packet answer, and a refused password.

Usage: rcon_check.py HOST PORT PASSWORD
"""
import sys

from rcon.exceptions import WrongPassword
from rcon.source import Client


def main():
    host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with Client(host, port, passwd=password, timeout=10) as client:
        answer = client.run("echo", "checked", "by", "rcon")
        assert answer == "checked by rcon", repr(answer)
        lines = client.run("long", "600").split("\n")
        # 600 lines of 22 bytes: over 13 KB, so at least four packets.
        assert len(lines) == 600, len(lines)
        assert lines[0] == "long answer line 00001" and lines[-1] == "long answer line 00600", lines[-1]
    try:
        with Client(host, port, passwd=password + "-wrong", timeout=10) as client:
            client.run("echo", "should not run")
    except WrongPassword:
        pass
    else:
        raise AssertionError("a wrong password was accepted")
    print("rcon check ok")


if __name__ == "__main__":
    main()
