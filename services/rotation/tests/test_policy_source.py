"""The policy file source: mtime change detection, and a bad file never replaces a good one."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from klm_common.policy import load_policy
from klm_rotation.adapters.policy_source import PolicySource


def write(path: Path, version: int, stamp: int) -> None:
    document = load_policy().model_dump(mode="json")
    document["version"] = version
    path.write_text(yaml.safe_dump(document))
    os.utime(path, ns=(stamp, stamp))


def test_a_changed_file_is_reloaded_and_a_broken_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, 1, 1_000_000_000)
    source = PolicySource(path)
    assert source.load().version == 1
    assert not source.changed()
    write(path, 2, 2_000_000_000)
    assert source.changed()
    reloaded = source.reload()
    assert reloaded is not None and reloaded.version == 2
    path.write_text("usages: {}\n")
    assert source.changed()
    assert source.reload() is None and source.invalid == 1


def test_without_a_file_the_default_policy_applies() -> None:
    source = PolicySource(None)
    assert source.load().name == "klm-default"
    assert not source.changed()
