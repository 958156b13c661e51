"""The rotation process. For now it observes klm.lifecycle (see klm_common.observer)."""

from __future__ import annotations

from starlette.applications import Starlette

from klm_common.observer import observer_app
from klm_common.service import serve
from klm_common.settings import KlmSettings


def create_app(settings: KlmSettings | None = None) -> Starlette:
    return observer_app("rotation", settings or KlmSettings())


def main() -> None:
    settings = KlmSettings()
    serve(create_app(settings), settings.http_host, settings.rotation_port)


if __name__ == "__main__":
    main()
