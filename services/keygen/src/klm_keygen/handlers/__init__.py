"""Keygen's message handlers, one module per area, one small function per message type.

* :mod:`.requests` — ``klm.requests``: generate_key, rotate_key, suspend/reactivate/revoke,
  schedule/cancel destruction (the public lifecycle requests)
* :mod:`.commands` — ``klm.commands``: destroy_key, deactivate_version (sent by rotation)
* :mod:`.usage` — ``klm.crypto.requests``: sign, verify, encrypt, decrypt, mac, mac_verify,
  wrap, unwrap (request/reply; replies on the requester's reply topic)
* :mod:`.backup` — ``klm.backup.commands``: wrap_for_backup, restore_versions,
  check_backups (sent by the backup service)
* :mod:`.checkpoint` — ``klm.commands``: sign_checkpoint (sent by audit)
* :mod:`.batch` — how a batch of either is served (inbox, chunks, one HSM call and one
  transaction per chunk); :mod:`.orphans` — the start-up sweep of resident objects with no
  keystore row (not a subscriber)

Each module has ``register(keygen)`` which subscribes its handlers on the broker;
``klm_keygen.app.AREAS`` lists the modules.
"""
