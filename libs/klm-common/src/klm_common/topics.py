"""KLM topic names (public contract, DESIGN §5) and how many partitions each gets."""

from __future__ import annotations

from dataclasses import dataclass

REQUESTS = "klm.requests"
LIFECYCLE = "klm.lifecycle"
DLQ = "klm.dlq"
CRYPTO_REQUESTS = "klm.crypto.requests"
#: internal: rotation/backup → keygen commands (destroy, deactivate version, wrap, restore)
COMMANDS = "klm.commands"
#: internal: inventory requests served by rotation (import_observed_key)
INVENTORY_REQUESTS = "klm.inventory.requests"
#: internal: backup service → keygen (wrap for backup, restore, drill checks)
BACKUP_COMMANDS = "klm.backup.commands"
#: internal: keygen and operators → backup service (wrapped blobs, drill results, DR)
BACKUP = "klm.backup"

PARTITIONS = {REQUESTS: 6, LIFECYCLE: 6, DLQ: 1, CRYPTO_REQUESTS: 6, COMMANDS: 6,
              INVENTORY_REQUESTS: 6, BACKUP_COMMANDS: 6, BACKUP: 6}


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under a prefix (empty in production; a namespace per test run)."""

    prefix: str = ""

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def requests(self) -> str:
        return self.name(REQUESTS)

    @property
    def lifecycle(self) -> str:
        return self.name(LIFECYCLE)

    @property
    def dlq(self) -> str:
        return self.name(DLQ)

    @property
    def crypto_requests(self) -> str:
        return self.name(CRYPTO_REQUESTS)

    @property
    def commands(self) -> str:
        return self.name(COMMANDS)

    @property
    def inventory_requests(self) -> str:
        return self.name(INVENTORY_REQUESTS)

    @property
    def backup_commands(self) -> str:
        return self.name(BACKUP_COMMANDS)

    @property
    def backup(self) -> str:
        return self.name(BACKUP)

    def all(self) -> dict[str, int]:
        return {self.name(base): n for base, n in PARTITIONS.items()}
