"""HSM operations of a key's end of life, run on the one HSM thread via ``Pkcs11Hsm.run``:
find the persistent objects of hsm-resident versions and destroy them (C_DestroyObject).

An hsm-resident version's objects carry ``CKA_ID = object_id(key_id, version)`` and
``CKA_LABEL = "klm:<CKA_ID hex>"`` (see :mod:`klm_keygen.adapters.hsm`); nothing else on the
token matches that pattern (the master KEK is ``klm-master-kek``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, ObjectClass

RESIDENT_LABEL = re.compile(r"^klm:[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class ResidentObject:
    """The token objects (secret key, or private + public key) of one resident version."""

    object_id: bytes
    label: str
    classes: tuple[str, ...]


def resident_label(obj_id: bytes) -> str:
    return f"klm:{obj_id.hex()}"


def _class_name(obj: Any) -> str:
    return ObjectClass(obj[Attribute.CLASS]).name.lower()


def resident_objects(session: Any, _kek: Any) -> list[ResidentObject]:
    """Every token object that looks like an hsm-resident key version, grouped by CKA_ID."""
    found: dict[bytes, list[str]] = {}
    for obj in list(session.get_objects({Attribute.TOKEN: True})):
        label = obj[Attribute.LABEL]
        if not RESIDENT_LABEL.match(label or ""):
            continue
        obj_id = bytes(obj[Attribute.ID])
        if resident_label(obj_id) == label:
            found.setdefault(obj_id, []).append(_class_name(obj))
    return [ResidentObject(k, resident_label(k), tuple(sorted(v))) for k, v in found.items()]


def destroy_objects(session: Any, _kek: Any, object_ids: Sequence[bytes]
                    ) -> dict[str, list[str]]:
    """C_DestroyObject every token object with one of ``object_ids``; returns, per id (hex),
    the classes destroyed — an empty list when nothing was left (a retried destruction)."""
    destroyed: dict[str, list[str]] = {}
    for obj_id in object_ids:
        objects = list(session.get_objects({Attribute.TOKEN: True, Attribute.ID: obj_id}))
        classes = []
        for obj in objects:
            classes.append(_class_name(obj))
            obj.destroy()
        destroyed[obj_id.hex()] = sorted(classes)
    return destroyed
