#!/usr/bin/env python3
"""Wait until a Kafka broker answers a Metadata request (stdlib only).

Used by infra/stack.sh: an open port is not enough, the broker must list
itself in the metadata (a KRaft broker does that once it is unfenced).
Speaks Metadata v4 (Kafka 4.x dropped v0-v3; v4-v8 share one layout and
are not "flexible", so no compact encoding is needed).

usage: kafka_ready.py HOST:PORT [--timeout SECONDS] [--pid PID]
exit 0: ready (prints broker count); 1: timeout; 2: the --pid process died.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

API_METADATA = 3
VERSION = 4


def _request(correlation_id: int) -> bytes:
    client_id = b"klm-ready"
    header = struct.pack(">hhih", API_METADATA, VERSION, correlation_id, len(client_id))
    # topics = null (-1: all topics), allow_auto_topic_creation = false
    body = struct.pack(">i?", -1, False)
    payload = header + client_id + body
    return struct.pack(">i", len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def broker_count(host: str, port: int) -> int:
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.settimeout(3)
        sock.sendall(_request(7))
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)
    correlation_id, _throttle, n_brokers = struct.unpack_from(">iii", data, 0)
    if correlation_id != 7:
        raise ConnectionError("unexpected correlation id")
    return n_brokers


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("--timeout", type=float, default=0)
    parser.add_argument("--pid", type=int, default=0)
    args = parser.parse_args()
    host, _, port = args.bootstrap.rpartition(":")
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            n = broker_count(host, int(port))
            if n > 0:
                print(f"{n} broker(s)")
                return 0
        except (OSError, struct.error):
            pass
        if args.pid and not alive(args.pid):
            return 2
        if time.monotonic() >= deadline:
            return 1
        time.sleep(0.3)


if __name__ == "__main__":
    sys.exit(main())
