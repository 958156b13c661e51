"""Settings shared by every KLM process (pydantic-settings, ``KLM_`` environment prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    """``.klm`` in the checkout (found from the working directory upwards), else ``~/.klm``."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".klm").is_dir() or (folder / "infra" / "stack.sh").is_file():
            return folder / ".klm"
    return Path.home() / ".klm"


class KlmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KLM_", extra="ignore")

    home: Path = Field(default_factory=_default_home)
    #: prefix of every topic name: empty in production, a random namespace in tests
    topic_prefix: str = ""
    kafka_bootstrap: str = "localhost:9092"
    #: Kafka client security: "none" (PLAINTEXT) or "sasl" (SASL/SCRAM-SHA-512, the
    #: secured stack of ``KLM_KAFKA_SECURITY=sasl infra/stack.sh up``; docs/security.md)
    kafka_security: Literal["none", "sasl"] = "none"
    #: SCRAM user; unset = the service's own principal (keygen, rotation, …), "admin" for
    #: the CLI, the SDK and tests
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    #: default: ``<home>/secrets/kafka-<username>-password`` (written by ``make up``)
    kafka_password_file: Path | None = None
    #: base DSN without credentials; each service logs in as its own role
    pg_dsn: str = "postgresql://127.0.0.1:5432/klm"
    pg_admin_dsn: str | None = None
    pg_pool_max: int = 10

    hsm_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    hsm_token_label: str = "klm"  # noqa: S105 - a token label, not a secret
    hsm_pin: str | None = None
    hsm_pin_file: Path | None = None

    audit_url: str = "http://localhost:8700"
    http_host: str = "127.0.0.1"
    keygen_port: int = 8701
    rotation_port: int = 8702
    backup_port: int = 8703
    audit_port: int = 8700

    #: length of a policy "day" in seconds: 86400 in production; tests shrink it so that
    #: cryptoperiods and destruction waiting periods (7–30 days) pass in seconds
    day_seconds: float = 86400.0

    # batching: how many records a consumer takes at once; how long an idle subscriber's
    # fetch waits before its loop turns (it returns as soon as records arrive: kafka.py)
    batch_max_records: int = 500
    batch_timeout_ms: int = 500
    outbox_batch: int = 1000

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    def secret(self, name: str) -> str:
        """Read a development secret that ``make up`` generated under ``.klm/secrets``."""
        return (self.secrets_dir / name).read_text().strip()

    def service_dsn(self, service: str) -> str:
        """DSN for ``service``'s own least-privilege role ``klm_<service>``."""
        parts = urlsplit(self.pg_dsn)
        if parts.username:
            return self.pg_dsn
        password = quote(self.secret(f"pg-{service}-password"), safe="")
        netloc = f"klm_{service}:{password}@{parts.hostname}:{parts.port or 5432}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def admin_dsn(self) -> str:
        if self.pg_admin_dsn:
            return self.pg_admin_dsn
        parts = urlsplit(self.pg_dsn)
        password = quote(self.secret("pg-admin-password"), safe="")
        netloc = f"postgres:{password}@{parts.hostname}:{parts.port or 5432}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def kafka_login(self, default_user: str) -> tuple[str, str]:
        """(SCRAM user, password): ``kafka_username`` or ``default_user``, the password
        from ``kafka_password``, ``kafka_password_file`` or the development secret file."""
        user = self.kafka_username or default_user
        if self.kafka_password is not None:
            return user, self.kafka_password.get_secret_value()
        path = self.kafka_password_file or self.secrets_dir / f"kafka-{user}-password"
        return user, path.read_text().strip()

    def hsm_user_pin(self) -> str:
        if self.hsm_pin:
            return self.hsm_pin
        path = self.hsm_pin_file or self.secrets_dir / "hsm-pin"
        return path.read_text().strip()
