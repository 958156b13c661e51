#!/usr/bin/env python3
"""Wait until a Kafka broker answers a Metadata request (stdlib only).

Used by infra/stack.sh: an open port is not enough, the broker must list
itself in the metadata (a KRaft broker does that once it is unfenced).
Speaks Metadata v4 (Kafka 4.x dropped v0-v3; v4-v8 share one layout and
are not "flexible", so no compact encoding is needed).

With ``--scram-user``/``--scram-password-file`` (the secured stack, KLM_KAFKA_SECURITY=sasl)
it first authenticates with SASL/SCRAM-SHA-512 (RFC 5802, SaslHandshake v1 +
SaslAuthenticate v1) on the same connection: the broker then also proves that the
credentials made at format time work.

usage: kafka_ready.py HOST:PORT [--timeout SECONDS] [--pid PID]
                      [--scram-user NAME --scram-password-file FILE]
exit 0: ready (prints broker count); 1: timeout; 2: the --pid process died;
3: authentication refused (wrong credentials: waiting will not help).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import secrets
import socket
import struct
import sys
import time

API_METADATA = 3
VERSION = 4
API_SASL_HANDSHAKE = 17
API_SASL_AUTHENTICATE = 36
MECHANISM = b"SCRAM-SHA-512"


class AuthenticationRefused(Exception):
    """The broker answered, and said no."""


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


def _call(sock: socket.socket, api: int, version: int, correlation_id: int, body: bytes) -> bytes:
    """One non-flexible request/response exchange (request header v1, response header v0)."""
    client_id = b"klm-ready"
    header = struct.pack(">hhih", api, version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    data = _recv_exact(sock, size)
    if struct.unpack_from(">i", data, 0)[0] != correlation_id:
        raise ConnectionError("unexpected correlation id")
    return data[4:]


def _authenticate_bytes(sock: socket.socket, correlation_id: int, message: bytes) -> bytes:
    data = _call(sock, API_SASL_AUTHENTICATE, 1, correlation_id,
                 struct.pack(">i", len(message)) + message)
    error, msg_len = struct.unpack_from(">hh", data, 0)
    pos = 4 + max(msg_len, 0)
    if error:
        text = data[4:pos].decode(errors="replace") if msg_len > 0 else ""
        raise AuthenticationRefused(f"error {error}: {text}")
    (n,) = struct.unpack_from(">i", data, pos)
    return data[pos + 4:pos + 4 + n]


def _scram_name(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


def scram_sha512(sock: socket.socket, user: str, password: str) -> None:
    """SASL/SCRAM-SHA-512 client (RFC 5802); raises AuthenticationRefused on a no."""
    data = _call(sock, API_SASL_HANDSHAKE, 1, 1, struct.pack(">h", len(MECHANISM)) + MECHANISM)
    if struct.unpack_from(">h", data, 0)[0]:
        raise AuthenticationRefused("SCRAM-SHA-512 not enabled on this listener")
    nonce = base64.b64encode(secrets.token_bytes(24)).decode()
    first_bare = f"n={_scram_name(user)},r={nonce}"
    server_first = _authenticate_bytes(sock, 2, f"n,,{first_bare}".encode()).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    if not fields["r"].startswith(nonce):
        raise AuthenticationRefused("server nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(fields["s"]),
                                 int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha512).digest()
    stored_key = hashlib.sha512(client_key).digest()
    without_proof = f"c=biws,r={fields['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha512).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    server_final = _authenticate_bytes(sock, 3, final).decode()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha512).digest()
    expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha512).digest())
    if server_final != f"v={expected.decode()}":
        raise AuthenticationRefused("server signature does not verify")


def broker_count(host: str, port: int, scram: tuple[str, str] | None = None) -> int:
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.settimeout(3)
        if scram is not None:
            scram_sha512(sock, *scram)
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
    parser.add_argument("--scram-user")
    parser.add_argument("--scram-password-file")
    args = parser.parse_args()
    host, _, port = args.bootstrap.rpartition(":")
    scram = None
    if args.scram_user:
        with open(args.scram_password_file, encoding="utf-8") as f:
            scram = (args.scram_user, f.read().strip())
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            n = broker_count(host, int(port), scram)
            if n > 0:
                print(f"{n} broker(s)")
                return 0
        except AuthenticationRefused as exc:
            print(f"authentication refused: {exc}", file=sys.stderr)
            return 3
        except (OSError, struct.error, KeyError, ValueError):
            pass
        if args.pid and not alive(args.pid):
            return 2
        if time.monotonic() >= deadline:
            return 1
        time.sleep(0.3)


if __name__ == "__main__":
    sys.exit(main())
