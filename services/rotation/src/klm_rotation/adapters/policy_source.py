"""Where the policy comes from: a file (``KLM_POLICY_FILE``) re-read when its mtime changes
or on SIGHUP, or the default policy shipped in klm-common. A file that does not validate is
logged and ignored: the policy in force stays."""

from __future__ import annotations

import logging
from pathlib import Path

from klm_common.policy import CryptoPolicy, PolicyInvalid, load_policy

log = logging.getLogger(__name__)
DEFAULT_PATH = "klm_common/policies/default.yaml"


class PolicySource:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.invalid = 0

    @property
    def name(self) -> str:
        return str(self.path) if self.path else DEFAULT_PATH

    def _mtime(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def load(self) -> CryptoPolicy:
        """Read the policy now; raises :class:`PolicyInvalid` (start-up must not go on)."""
        self._stamp = self._mtime()
        return load_policy(self.path)

    def changed(self) -> bool:
        return self.path is not None and self._mtime() != self._stamp

    def reload(self) -> CryptoPolicy | None:
        """The new policy, or None if the file is unreadable or invalid (logged)."""
        try:
            return self.load()
        except (OSError, PolicyInvalid) as exc:
            self.invalid += 1
            log.error("policy %s not reloaded, the previous one stays in force: %s",
                      self.name, exc)
            return None
