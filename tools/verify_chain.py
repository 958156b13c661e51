#!/usr/bin/env python3
"""Independent verifier of the KLM audit hash chain, from the API's output alone.

Standard library only and no KLM import: it re-implements the encoding of docs/audit.md,
pages through ``GET /v1/events`` (an unscoped token: the chain spans every tenant), and
recomputes every link from genesis::

    hash_n = SHA-256(hash_{n-1} || uint64_be(n) || canonical_json(event_n)),  hash_0 = 32 zero bytes

Usage::

    tools/verify_chain.py --url http://localhost:8700 --token-file .klm/secrets/audit-auditor-token
    tools/verify_chain.py --dump events.json            # a saved list of /v1/events rows
    tools/verify_chain.py ... --checkpoint 1200:ab12…    # a head you trust: catches rollbacks

Exit status 0 when the chain holds (and contains every checkpoint), 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

GENESIS = bytes(32)


def normalise(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN/Infinity")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def canonical(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, integral floats as integers (docs/audit.md)."""
    return json.dumps(normalise(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def link(prev: bytes, sequence: int, event: dict[str, Any]) -> bytes:
    return hashlib.sha256(prev + struct.pack(">Q", sequence) + canonical(event)).digest()


def from_api(url: str, token: str, page: int = 1000) -> Iterator[dict[str, Any]]:
    cursor = None
    while True:
        query = {"limit": str(page), **({"cursor": cursor} if cursor else {})}
        request = urllib.request.Request(  # noqa: S310 - the auditor names the URL
            f"{url.rstrip('/')}/v1/events?{urllib.parse.urlencode(query)}",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            body = json.load(response)
        yield from body["events"]
        cursor = body.get("next_cursor")
        if not cursor:
            return


def verify(rows: Iterator[dict[str, Any]], checkpoints: dict[int, str]) -> tuple[bool, str]:
    prev, expected, count = GENESIS, 1, 0
    for row in rows:
        seq = int(row["sequence"])
        if seq != expected:
            return False, f"sequence {expected}: missing (next row is {seq})"
        if bytes.fromhex(row["prev_hash"]) != prev:
            return False, f"sequence {seq}: prev_hash is not the hash of sequence {seq - 1}"
        digest = link(prev, seq, row["event"])
        if digest.hex() != row["hash"]:
            return False, f"sequence {seq}: hash does not match the event"
        if seq in checkpoints and checkpoints.pop(seq) != digest.hex():
            return False, f"sequence {seq}: differs from the trusted checkpoint (rewritten)"
        prev, expected, count = digest, expected + 1, count + 1
    if checkpoints:
        first = min(checkpoints)
        return False, (f"sequence {first}: trusted checkpoint beyond the head #{expected - 1}"
                       " (the log was truncated or rolled back)")
    return True, f"chain intact: {count} events, head #{expected - 1} {prev.hex()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KLM_AUDIT_URL", "http://localhost:8700"))
    parser.add_argument("--token", default=os.environ.get("KLM_AUDIT_TOKEN"))
    parser.add_argument("--token-file")
    parser.add_argument("--dump", help="verify a JSON file holding a list of /v1/events rows")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="SEQUENCE:HEXHASH of a head you trust (repeatable)")
    args = parser.parse_args()
    checkpoints = {int(s): h.lower() for s, h in (c.split(":", 1) for c in args.checkpoint)}
    if args.dump:
        with open(args.dump, encoding="utf-8") as f:
            rows: Iterator[dict[str, Any]] = iter(json.load(f))
    else:
        token = args.token
        if not token and args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        if not token:
            parser.error("give --token, --token-file or KLM_AUDIT_TOKEN")
        rows = from_api(args.url, token)
    ok, message = verify(rows, checkpoints)
    print(("OK " if ok else "BROKEN ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
