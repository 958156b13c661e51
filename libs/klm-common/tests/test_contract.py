"""The checked-in contract (docs/contract) is what the code exports: no silent drift."""

from pathlib import Path

from klm_common.contract import asyncapi_document, render, topic_of

CONTRACT = Path(__file__).resolve().parents[3] / "docs" / "contract"


def test_checked_in_contract_matches_the_models() -> None:
    stale = [path for path, text in render().items()
             if not (CONTRACT / path).exists() or (CONTRACT / path).read_text() != text]
    assert not stale, f"run `klm schemas export` to refresh: {stale[:5]}"


def test_every_topic_has_its_messages() -> None:
    doc = asyncapi_document()
    assert doc["channels"]["klm_requests"]["messages"]
    assert topic_of("klm.request.rejected") == "klm.lifecycle"
    assert topic_of("klm.request.generate_key") == "klm.requests"
    assert topic_of("klm.crypto.reply") == "klm.crypto.replies.{client}"
    assert topic_of("klm.backup.versions_wrapped") == "klm.backup"


def test_every_event_type_has_a_topic() -> None:
    from klm_common.events import EVENT_TYPES

    for event_type in EVENT_TYPES:
        assert topic_of(event_type)
