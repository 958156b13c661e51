"""The backup service's tag key (HMAC-SHA256, see :mod:`klm_backup.domain.integrity`).

It lives in a private file next to the other service secrets, never in the backup
database: whoever can write the ``backups`` table cannot forge a tag. Losing it does not
lose a key (a blob's KWP integrity and KCV are still checked by the HSM), but every backup
would then be refused until re-tagged by an operator — keep it with the off-site copies.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TAG_KEY_FILE = "backup-tag-key"


def load_tag_key(secrets_dir: Path) -> bytes:
    """Read the key, creating it (0600, 32 random bytes) on first use."""
    path = secrets_dir / TAG_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return bytes.fromhex(path.read_text().strip())
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())
