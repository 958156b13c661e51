import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klm_common.envelope import MAX_RECORD_BYTES, EnvelopeInvalid, make_event, parse_envelope
from klm_common.errors import KlmError
from klm_common.events import EVENT_TYPES, GenerateKey, RequestRejected, parse_data


def test_round_trip_and_correlation() -> None:
    request = make_event(GenerateKey.event_type, {"owner": "acme", "name": "n",
                                                  "algorithm": "AES"}, source="t")
    answer = make_event(RequestRejected.event_type, RequestRejected(
        code="x", message="m", request_type=request.type), source="k", cause=request)
    assert parse_envelope(request.to_bytes()) == request
    assert answer.correlationid == request.id and answer.causationid == request.id
    assert isinstance(parse_data(request), GenerateKey)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "not JSON"),
    (b"[1, 2]", "not a CloudEvent"),
    (b'{"id": "x"}', "not a KLM CloudEvent"),
    (b"x" * (MAX_RECORD_BYTES + 1), "exceeds"),
    (None, "no value"),
])
def test_bad_records_have_precise_reasons(raw: bytes | None, reason: str) -> None:
    with pytest.raises(EnvelopeInvalid) as info:
        parse_envelope(raw)
    assert reason in info.value.message


def test_every_type_is_registered_once() -> None:
    assert all(cls.event_type == name for name, cls in EVENT_TYPES.items())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_parser(raw: bytes) -> None:
    try:
        event = parse_envelope(raw)
    except EnvelopeInvalid:
        return
    with contextlib.suppress(KlmError):
        parse_data(event)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(
                               st.text(max_size=8), c, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["owner", "name", "algorithm", "size", "curve",
                                        "usages", "protection", "labels", "x"]),
                       json_values, max_size=8))
def test_arbitrary_payloads_are_accepted_or_coded(data: dict[str, object]) -> None:
    raw = json.dumps({"specversion": "1.0", "id": "i", "source": "s", "time":
                      "2026-11-28T10:00:00Z", "type": GenerateKey.event_type,
                      "data": data}).encode()
    try:
        parse_data(parse_envelope(raw))
    except KlmError as exc:
        assert exc.code
