"""``klm ceremony`` — custody of the backup KEK (M-of-N custodian shares) — and
``klm backup`` — operator commands to the backup service (disaster recovery, drills).

``init`` makes a new AES-256 backup KEK with the HSM's RNG, splits it with Shamir's scheme
into N custodian shares (threshold M), writes one share file per custodian, proves that
every M-subset rebuilds it, and only then imports it into the token as a persistent,
sensitive, NON-extractable object (label ``klm-backup-kek``). KLM keeps no share.
``recover`` rebuilds it from M share files into a (new) token after a disaster; fewer than
M shares are refused before any arithmetic, and a rebuilt key whose check value differs
from the one the shares record (mixed or altered shares) is refused too.
The ceremony is described step by step in ``docs/backup.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from klm_common.envelope import make_event
from klm_common.errors import KlmError
from klm_common.events import RecoverAll, StartDrill
from klm_common.settings import KlmSettings
from klm_common.shamir import Share, ShareError, combine, split
from klm_common.topics import Topics

BACKUP_KEK_LABEL = "klm-backup-kek"
HEADER = "KLM BACKUP KEK SHARE v1"
ceremony_app = typer.Typer(help="Backup KEK custody: M-of-N custodian shares",
                           no_args_is_help=True)
backup_app = typer.Typer(help="Backup service: disaster recovery and restore drills",
                         no_args_is_help=True)
console = Console()


class CeremonyError(KlmError):
    code = "ceremony_failed"


# ---- share files ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ShareFile:
    ceremony: str
    kek_kcv: str
    threshold: int
    total: int
    share: Share

    def lines(self) -> list[str]:
        return [HEADER, f"ceremony: {self.ceremony}", f"kek-label: {BACKUP_KEK_LABEL}",
                f"kek-kcv: {self.kek_kcv}", f"threshold: {self.threshold}",
                f"shares: {self.total}", f"share-index: {self.share.x}",
                f"share: {self.share.y.hex()}"]

    def render(self) -> str:
        body = self.lines()
        return "\n".join([*body, f"checksum: {_checksum(body)}"]) + "\n"

    @classmethod
    def parse(cls, text: str, origin: str) -> ShareFile:
        lines = [line.strip() for line in text.strip().splitlines()]
        if not lines or lines[0] != HEADER or not lines[-1].startswith("checksum: "):
            raise CeremonyError(f"{origin}: not a KLM backup KEK share")
        if lines[-1].removeprefix("checksum: ") != _checksum(lines[:-1]):
            raise CeremonyError(f"{origin}: checksum mismatch — the share was altered or "
                                "mistyped")
        fields = dict(line.split(": ", 1) for line in lines[1:-1])
        try:
            return cls(fields["ceremony"], fields["kek-kcv"], int(fields["threshold"]),
                       int(fields["shares"]),
                       Share(int(fields["share-index"]), bytes.fromhex(fields["share"])))
        except (KeyError, ValueError) as exc:
            raise CeremonyError(f"{origin}: malformed share ({exc})") from None


def _checksum(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def aes_kcv(key: bytes) -> str:
    """Key check value as PKCS#11 tokens compute it: AES-ECB of a zero block, 3 bytes."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KCV
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3].hex()


def rebuild(files: list[ShareFile]) -> bytearray:
    """The backup KEK from M share files, or a clear refusal."""
    if not files:
        raise CeremonyError("no shares given")
    first = files[0]
    if any((f.ceremony, f.kek_kcv, f.threshold) != (first.ceremony, first.kek_kcv,
                                                    first.threshold) for f in files):
        raise CeremonyError("the shares come from different ceremonies")
    distinct = {f.share.x: f.share for f in files}
    if len(distinct) < first.threshold:
        raise CeremonyError(f"{len(distinct)} distinct share(s) given; this backup KEK needs "
                            f"{first.threshold} of {first.total} custodians — refused")
    try:
        key = bytearray(combine(list(distinct.values())[:first.threshold]))
    except ShareError as exc:
        raise CeremonyError(exc.message) from None
    if aes_kcv(bytes(key)) != first.kek_kcv:
        _wipe(key)
        raise CeremonyError("the rebuilt key does not match the recorded check value: a "
                            "share is wrong")
    return key


def _wipe(buffer: bytearray) -> None:
    """Best effort: Python may hold other copies; this one at least does not linger."""
    for i in range(len(buffer)):
        buffer[i] = 0


# ---- the token ------------------------------------------------------------------------------
# python-pkcs11 and cryptography are imported where used: they come with klm-keygen, which
# the host running a ceremony has (it is the host with the HSM); the rest of the CLI does not
# need them.
def _open_session(settings: KlmSettings) -> Any:
    import pkcs11

    lib = pkcs11.lib(settings.hsm_module)
    token = lib.get_token(token_label=settings.hsm_token_label)
    return token.open(rw=True, user_pin=settings.hsm_user_pin())


def _existing_kek(session: Any) -> Any | None:
    import pkcs11
    from pkcs11 import KeyType, ObjectClass

    try:
        return session.get_key(label=BACKUP_KEK_LABEL, key_type=KeyType.AES,
                               object_class=ObjectClass.SECRET_KEY)
    except pkcs11.NoSuchKey:
        return None


def import_kek(session: Any, key: bytes) -> str:
    """Import as a persistent, sensitive, non-extractable wrap/unwrap-only key; its KCV."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    obj = session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: key, Attribute.LABEL: BACKUP_KEK_LABEL, Attribute.TOKEN: True,
        Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False, Attribute.SIGN: False, Attribute.VERIFY: False,
        Attribute.DERIVE: False})
    return bytes(obj[Attribute.CHECK_VALUE]).hex()


# ---- commands -------------------------------------------------------------------------------
@ceremony_app.command("init")
def ceremony_init(
    out: Annotated[Path, typer.Option(help="folder for the custodian share files")],
    shares: Annotated[int, typer.Option(help="N: number of custodians")] = 5,
    threshold: Annotated[int, typer.Option(help="M: custodians needed to recover")] = 3,
) -> None:
    """Create the backup KEK in the token and hand it to N custodians as M-of-N shares."""
    try:
        paths = _init(KlmSettings(), out, shares, threshold)
    except KlmError as exc:
        console.print(f"[red]ceremony refused[/red]: {exc.message}")
        raise typer.Exit(1) from None
    console.print(f"backup KEK {BACKUP_KEK_LABEL!r} is in the token; give each custodian "
                  f"one file and delete it here ({threshold} of {shares} recover it):")
    for path in paths:
        console.print(f"  {path}")


def _init(settings: KlmSettings, out: Path, n: int, m: int) -> list[Path]:
    session = _open_session(settings)
    try:
        if _existing_kek(session) is not None:
            raise CeremonyError(f"the token already holds {BACKUP_KEK_LABEL!r}; a second "
                                "ceremony would orphan the backups made under it")
        key = bytearray(session.generate_random(256))
        try:
            kcv = aes_kcv(bytes(key))
            ceremony = str(uuid.uuid4())
            files = [ShareFile(ceremony, kcv, m, n, s) for s in split(bytes(key), n, m)]
            _prove(files, key)
            paths = _write(out, files)
            if import_kek(session, bytes(key)) != kcv:
                raise CeremonyError("the token computed another check value for the KEK")
        finally:
            _wipe(key)
        return paths
    except ShareError as exc:
        raise CeremonyError(exc.message) from None
    finally:
        session.close()


def _prove(files: list[ShareFile], key: bytearray) -> None:
    """Every M-subset must rebuild the key before the key is committed to the token."""
    m = files[0].threshold
    for subset in itertools.combinations(files, m):
        rebuilt = rebuild(list(subset))
        same = rebuilt == key
        _wipe(rebuilt)
        if not same:
            raise CeremonyError("a share subset did not rebuild the key")


def _write(out: Path, files: list[ShareFile]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in files:
        path = out / f"custodian-{f.share.x}.share"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f.render())
        paths.append(path)
    return paths


@ceremony_app.command("recover")
def ceremony_recover(
    share: Annotated[list[Path], typer.Option(help="a custodian's share file (repeat)")],
) -> None:
    """Rebuild the backup KEK from M custodian shares into this (new) token."""
    try:
        kcv = _recover(KlmSettings(), share)
    except KlmError as exc:
        console.print(f"[red]recovery refused[/red]: {exc.message}")
        raise typer.Exit(1) from None
    console.print(f"backup KEK {BACKUP_KEK_LABEL!r} (check value {kcv}) is in the token")


def _recover(settings: KlmSettings, paths: list[Path]) -> str:
    files = [ShareFile.parse(_read(p), str(p)) for p in paths]
    key = rebuild(files)
    try:
        session = _open_session(settings)
        try:
            existing = _existing_kek(session)
            if existing is not None:
                from pkcs11 import Attribute

                kcv = bytes(existing[Attribute.CHECK_VALUE]).hex()
                if kcv != files[0].kek_kcv:
                    raise CeremonyError("the token holds ANOTHER backup KEK; refusing")
                return kcv
            return import_kek(session, bytes(key))
        finally:
            session.close()
    finally:
        _wipe(key)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CeremonyError(f"{path}: cannot read the share ({exc.strerror})") from None


@backup_app.command("recover")
def backup_recover(reason: str = "disaster recovery") -> None:
    """Ask the backup service to restore every non-destroyed key (after `ceremony recover`)."""
    event = make_event(RecoverAll.event_type, RecoverAll(reason=reason), source="klm/cli")
    asyncio.run(_publish(KlmSettings(), event.to_bytes(), event.id))
    console.print(f"recovery {event.id} requested")


@backup_app.command("drill")
def backup_drill(sample: int = 20) -> None:
    """Run a restore drill now on ``sample`` backups."""
    event = make_event(StartDrill.event_type, StartDrill(sample=sample), source="klm/cli")
    asyncio.run(_publish(KlmSettings(), event.to_bytes(), event.id))
    console.print(f"drill requested ({event.id})")


async def _publish(settings: KlmSettings, value: bytes, key: str) -> None:
    from klm_common.kafka import make_producer

    producer = make_producer(settings, "klm-cli")
    await producer.start()
    try:
        await producer.send_and_wait(Topics(settings.topic_prefix).backup, value,
                                     key=key.encode())
    finally:
        await producer.stop()


def register(app: typer.Typer) -> None:
    app.add_typer(ceremony_app, name="ceremony")
    app.add_typer(backup_app, name="backup")
