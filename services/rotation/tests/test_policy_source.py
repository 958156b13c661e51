"""The policy source: change detection over the default file and the policy directory, and
a set that does not load never replaces a good one."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from klm_common.policy import load_policy
from klm_rotation.adapters.policy_source import PolicySource


def write(path: Path, version: int, stamp: int, name: str = "klm-default") -> None:
    document = load_policy().model_dump(mode="json")
    document["name"], document["version"] = name, version
    path.write_text(yaml.safe_dump(document))
    os.utime(path, ns=(stamp, stamp))


def test_a_changed_file_is_reloaded_and_a_broken_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, 1, 1_000_000_000)
    source = PolicySource(path)
    assert source.load().default.version == 1
    assert not source.changed()
    write(path, 2, 2_000_000_000)
    assert source.changed()
    reloaded = source.reload()
    assert reloaded is not None and reloaded.default.version == 2
    path.write_text("usages: {}\n")
    assert source.changed()
    assert source.reload() is None and source.invalid == 1


def test_without_a_file_the_default_policy_applies() -> None:
    source = PolicySource(None)
    assert source.load().default.name == "klm-default"
    assert not source.watched and not source.changed()


def test_files_of_the_directory_are_watched(tmp_path: Path) -> None:
    named = tmp_path / "named"
    named.mkdir()
    write(named / "short.yaml", 1, 1_000_000_000, name="short")
    source = PolicySource(None, named)
    assert source.load().names == ["klm-default", "short"]
    assert not source.changed()
    write(named / "short.yaml", 2, 2_000_000_000, name="short")  # edited
    assert source.changed()
    reloaded = source.reload()
    assert reloaded is not None and reloaded.for_key("short").version == 2
    write(named / "long.yml", 1, 1_000_000_000, name="long")  # added (an old mtime)
    assert source.changed()
    reloaded = source.reload()
    assert reloaded is not None and reloaded.names == ["klm-default", "long", "short"]
    (named / "short.yaml").unlink()  # removed
    assert source.changed()
    reloaded = source.reload()
    assert reloaded is not None and reloaded.names == ["klm-default", "long"]


def test_a_duplicate_name_keeps_the_set_in_force(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", 1, 1_000_000_000, name="short")
    source = PolicySource(None, tmp_path)
    assert source.load().names == ["klm-default", "short"]
    write(tmp_path / "b.yaml", 1, 2_000_000_000, name="short")
    assert source.changed()
    assert source.reload() is None and source.invalid == 1
    assert not source.changed()  # not retried until a file changes again
