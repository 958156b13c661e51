"""Start-up sweep: destroy hsm-resident objects that no keystore version owns.

A crash between the HSM call that made a resident version and the commit of its keystore
row leaves a persistent token object that no key will ever reference. Before keygen
consumes anything, it lists the token's resident objects (label ``klm:<id>``), destroys
those with no live version in the keystore, and reports each as
``klm.key.orphan_destroyed`` through the outbox.
"""

from __future__ import annotations

import logging
from typing import Protocol

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import KeyOrphanDestroyed
from klm_keygen.adapters.hsm import Pkcs11Hsm
from klm_keygen.adapters.hsm_lifecycle import ResidentObject
from klm_keygen.domain.generation import SOURCE

log = logging.getLogger(__name__)


class OrphanKeystore(Protocol):
    async def known_object_ids(self, object_ids: list[bytes]) -> set[bytes]: ...

    async def queue_facts(self, facts: list[CloudEvent]) -> None: ...


async def destroy_orphans(hsm: Pkcs11Hsm, keystore: OrphanKeystore) -> list[CloudEvent]:
    """Destroy and report the orphans; returns the facts queued."""
    found = await hsm.resident_objects()
    if not found:
        return []
    known = await keystore.known_object_ids([o.object_id for o in found])
    orphans = [o for o in found if o.object_id not in known]
    if not orphans:
        return []
    destroyed = await hsm.destroy_objects([o.object_id for o in orphans])
    facts = [_fact(o, destroyed.get(o.object_id.hex(), []), hsm.token_label) for o in orphans]
    await keystore.queue_facts(facts)
    log.warning("destroyed %d orphan resident object group(s) on token %r",
                len(orphans), hsm.token_label)
    return facts


def _fact(orphan: ResidentObject, classes: list[str], token: str) -> CloudEvent:
    data = KeyOrphanDestroyed(hsm_object_id=orphan.object_id.hex(), label=orphan.label,
                              object_classes=classes, token_label=token)
    # a fresh id: the same CKA_ID can be orphaned again if a retried request crashes again
    return make_event(KeyOrphanDestroyed.event_type, data, source=SOURCE)
