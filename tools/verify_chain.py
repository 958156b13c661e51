#!/usr/bin/env python3
"""Independent verifier of the KLM audit hash chain, from the API's output alone.

No KLM import: it re-implements the encoding of docs/audit.md, pages through
``GET /v1/events`` (an unscoped token: the chain spans every tenant), and recomputes every
link from genesis::

    hash_n = SHA-256(hash_{n-1} || uint64_be(n) || canonical_json(event_n)),  hash_0 = 32 zero bytes

Every signed checkpoint in the chain (``klm.audit.checkpoint``), and every one you kept
(``--checkpoint-file``), is checked too: its ECDSA P-256 signature over
``b"KLM-AUDIT-CHECKPOINT-1" || uint64_be(sequence) || head_hash || int64_be(µs since epoch)``
with the public key it carries (pin that key with ``--trusted-key``), and that the chain
still has ``head_hash`` at ``sequence`` — a truncated tail or an older dump fails here.
Signatures need the ``cryptography`` package; the chain alone needs only the standard library.

Usage::

    tools/verify_chain.py --url http://localhost:8700 --token-file .klm/secrets/audit-auditor-token
    tools/verify_chain.py --dump events.json            # a saved list of /v1/events rows
    tools/verify_chain.py ... --checkpoint 1200:ab12…    # a head you trust: catches rollbacks
    tools/verify_chain.py ... --checkpoint-file last.json --trusted-key <sha256 of the key>
                              # last.json: "last_checkpoint" of GET /v1/audit/verify, kept

Exit status 0 when the chain holds (and contains every checkpoint), 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import struct
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

GENESIS = bytes(32)
CHECKPOINT_TYPE = "klm.audit.checkpoint"
CHECKPOINT_CONTEXT = b"KLM-AUDIT-CHECKPOINT-1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


class Broken(Exception):
    """The chain or a checkpoint does not hold; the message names the sequence."""


def walk(rows: Iterator[dict[str, Any]], checkpoints: dict[int, str],
         signed: list[dict[str, Any]]) -> list[bytes]:
    """Recompute the chain; return ``hashes`` (hashes[n] = hash of sequence n) and collect
    the signed checkpoints found in it into ``signed``."""
    hashes = [GENESIS]
    for row in rows:
        seq, prev = int(row["sequence"]), hashes[-1]
        if seq != len(hashes):
            raise Broken(f"sequence {len(hashes)}: missing (next row is {seq})")
        if bytes.fromhex(row["prev_hash"]) != prev:
            raise Broken(f"sequence {seq}: prev_hash is not the hash of sequence {seq - 1}")
        digest = link(prev, seq, row["event"])
        if digest.hex() != row["hash"]:
            raise Broken(f"sequence {seq}: hash does not match the event")
        if seq in checkpoints and checkpoints.pop(seq) != digest.hex():
            raise Broken(f"sequence {seq}: differs from the trusted checkpoint (rewritten)")
        if row["event"].get("type") == CHECKPOINT_TYPE:
            signed.append({**row["event"].get("data", {}), "event_sequence": seq})
        hashes.append(digest)
    if checkpoints:
        raise Broken(f"sequence {min(checkpoints)}: trusted checkpoint beyond the head "
                     f"#{len(hashes) - 1} (the log was truncated or rolled back)")
    return hashes


def verify(rows: Iterator[dict[str, Any]], checkpoints: dict[int, str],
           signed: list[dict[str, Any]] | None = None,
           trusted_keys: frozenset[str] = frozenset()) -> tuple[bool, str]:
    """The chain, the heads you trust (``checkpoints``), then every signed checkpoint: those
    found in the chain and those you kept (``signed``)."""
    signed = list(signed or [])
    try:
        hashes = walk(rows, checkpoints, signed)
        for cp in sorted(signed, key=lambda c: int(c.get("sequence", 0))):
            check_signed(cp, hashes, trusted_keys)
    except Broken as exc:
        return False, str(exc)
    keys = sorted({str(c.get("signing_key_id")) for c in signed})
    return True, (f"chain intact: {len(hashes) - 1} events, head #{len(hashes) - 1} "
                  f"{hashes[-1].hex()}; {len(signed)} signed checkpoint(s) verified"
                  + (f" (key {', '.join(keys)})" if keys else ""))


def check_signed(cp: dict[str, Any], hashes: list[bytes], trusted_keys: frozenset[str]) -> None:
    """Raise :class:`Broken` unless the signed checkpoint holds against the chain."""
    where = f"checkpoint of #{cp.get('sequence')} (event #{cp.get('event_sequence', '?')})"
    sequence, head_hash, message, public_key, signature = parse_signed(cp, where)
    key_id = hashlib.sha256(public_key).hexdigest()
    if key_id != cp.get("signing_key_id") or (trusted_keys and key_id not in trusted_keys):
        raise Broken(f"{where}: signed by key {key_id}, not a trusted checkpoint key")
    if not signature_holds(public_key, signature, message):
        raise Broken(f"{where}: the signature does not verify (forged or altered checkpoint)")
    head = len(hashes) - 1
    if sequence > head:
        raise Broken(f"sequence {head + 1}: the log ends at #{head} but the signed {where} "
                     "covers more: the tail was truncated or an older state restored "
                     "(rollback)")
    if hashes[sequence] != head_hash:
        raise Broken(f"sequence {sequence}: the chain differs from the signed {where} "
                     "(rewritten)")


def parse_signed(cp: dict[str, Any], where: str) -> tuple[int, bytes, bytes, bytes, bytes]:
    """(sequence, head hash, signed message, public key DER, signature DER)."""
    try:
        sequence, head_hash = int(cp["sequence"]), bytes.fromhex(cp["head_hash"])
        micros = (datetime.fromisoformat(cp["time"]) - EPOCH) // timedelta(microseconds=1)
        public_key = base64.b64decode(cp["public_key"], validate=True)
        signature = base64.b64decode(cp["signature"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise Broken(f"{where}: not a signed checkpoint ({type(exc).__name__})") from None
    if cp.get("algorithm") != "ECDSA-P256-SHA256" or len(head_hash) != 32 or sequence < 1:
        raise Broken(f"{where}: unsupported algorithm {cp.get('algorithm')!r}")
    message = (CHECKPOINT_CONTEXT + sequence.to_bytes(8, "big") + head_hash
               + micros.to_bytes(8, "big", signed=True))
    return sequence, head_hash, message, public_key, signature


def signature_holds(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        sys.exit("checking checkpoint signatures needs the 'cryptography' package")
    try:
        key = serialization.load_der_public_key(public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            return False
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KLM_AUDIT_URL", "http://localhost:8700"))
    parser.add_argument("--token", default=os.environ.get("KLM_AUDIT_TOKEN"))
    parser.add_argument("--token-file")
    parser.add_argument("--dump", help="verify a JSON file holding a list of /v1/events rows")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="SEQUENCE:HEXHASH of a head you trust (repeatable)")
    parser.add_argument("--checkpoint-file", action="append", default=[],
                        help="JSON file: a signed checkpoint you kept (the last_checkpoint of "
                             "GET /v1/audit/verify), or a list of them (repeatable)")
    parser.add_argument("--trusted-key", action="append", default=[],
                        help="SHA-256 (hex) of the checkpoint public key you trust")
    args = parser.parse_args()
    kept: list[dict[str, Any]] = []
    for name in args.checkpoint_file:
        with open(name, encoding="utf-8") as f:
            loaded = json.load(f)
        kept += loaded if isinstance(loaded, list) else [loaded]
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
    ok, message = verify(rows, checkpoints, kept,
                         frozenset(k.lower() for k in args.trusted_key))
    print(("OK " if ok else "BROKEN ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
