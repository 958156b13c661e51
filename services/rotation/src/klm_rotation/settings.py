"""Rotation's settings: the shared ``KLM_`` settings plus the policies (default file, named
ones in a directory) and the pace of the scheduler, the compliance scan and the gauges."""

from __future__ import annotations

from pathlib import Path

from klm_common.settings import KlmSettings


class RotationSettings(KlmSettings):
    #: the default crypto policy (YAML/JSON): keys naming no policy follow it; the shipped
    #: default policy when unset
    policy_file: Path | None = None
    #: named policies, one document per *.yaml/*.yml/*.json file (each with its own unique
    #: ``name``): a key naming one follows it
    policy_dir: Path | None = None
    #: how often the file's mtime is checked (SIGHUP reloads at once)
    policy_poll_seconds: float = 2.0
    #: the scheduler looks for due work at least this often (and at once when woken)
    schedule_poll_seconds: float = 1.0
    #: due rows claimed per transaction
    dispatch_batch: int = 2000
    #: concurrent dispatch transactions (each claims its own rows with SKIP LOCKED)
    dispatch_workers: int = 2
    #: keys per compliance-scan page, and the pause between full passes (default: one
    #: policy day, at most 5 minutes)
    scan_page_size: int = 1000
    scan_pass_seconds: float | None = None
    #: how often the gauges (open findings, keys, oldest active key, rotations due) are
    #: re-read from the inventory
    findings_gauge_seconds: float = 10.0
    #: klm.rotation.due counts the rotations due within this many policy days from now
    #: (including those already due and not yet done)
    rotation_notice_days: float = 1.0

    @property
    def schedule_poll(self) -> float:
        return max(0.1, min(self.schedule_poll_seconds, self.day_seconds / 10))

    @property
    def scan_pause(self) -> float:
        if self.scan_pass_seconds is not None:
            return self.scan_pass_seconds
        return max(0.5, min(300.0, self.day_seconds))
