"""Where the policies come from: the default policy file (``KLM_POLICY_FILE``, else the one
shipped in klm-common) and the named policies of a directory (``KLM_POLICY_DIR``: every
``*.yaml``/``*.yml``/``*.json``). The set is re-read when a file's mtime or size changes, a
file comes or goes, or on SIGHUP. A set that does not load (a file that does not validate,
two policies of one name) is logged and ignored as a whole: the set in force stays."""

from __future__ import annotations

import logging
from pathlib import Path

from klm_common.policy import (
    SHIPPED_DEFAULT,
    PolicyInvalid,
    PolicySet,
    load_policy_set,
    policy_files,
)

log = logging.getLogger(__name__)
DEFAULT_PATH = SHIPPED_DEFAULT
Stamp = tuple[tuple[str, int, int], ...]


class PolicySource:
    def __init__(self, path: Path | None, directory: Path | None = None) -> None:
        self.path = path
        self.directory = directory
        self._stamp: Stamp | None = None
        self.invalid = 0

    @property
    def name(self) -> str:
        """Where the default policy comes from."""
        return str(self.path) if self.path else DEFAULT_PATH

    @property
    def watched(self) -> bool:
        """False when only the shipped default applies (nothing on disk can change)."""
        return self.path is not None or self.directory is not None

    def _files(self) -> list[Path]:
        files = [self.path] if self.path is not None else []
        if self.directory is not None:
            try:
                files += policy_files(self.directory)
            except (OSError, PolicyInvalid):  # a vanished directory is a change too
                files.append(self.directory)
        return files

    def _current(self) -> Stamp:
        stamps = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                stamps.append((str(path), -1, -1))
                continue
            stamps.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def load(self) -> PolicySet:
        """Read every policy now; raises :class:`PolicyInvalid` or :class:`OSError`
        (start-up must not go on)."""
        self._stamp = self._current()
        return load_policy_set(self.path, self.directory)

    def changed(self) -> bool:
        return self.watched and self._current() != self._stamp

    def reload(self) -> PolicySet | None:
        """The new set, or None if a file is unreadable or invalid (logged)."""
        try:
            return self.load()
        except (OSError, PolicyInvalid) as exc:
            self.invalid += 1
            log.error("policies not reloaded, the previous ones stay in force: %s", exc)
            return None
