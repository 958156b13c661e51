"""Keygen's message handlers, one module per area, one small function per message type.

* :mod:`.requests` — ``klm.requests``: generate_key, rotate_key, suspend/reactivate/revoke,
  schedule/cancel destruction (the public lifecycle requests)

Each module has ``register(keygen)`` which subscribes its handlers on the broker;
``klm_keygen.app.AREAS`` lists the modules.
"""
