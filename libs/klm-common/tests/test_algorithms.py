import pytest

from klm_common.algorithms import Algorithm, KeyClass, Usage, key_spec
from klm_common.errors import KlmError


@pytest.mark.parametrize(("args", "label", "size"), [
    (("AES-256",), "AES-256", 256),
    (("AES", 128), "AES-128", 128),
    (("EC-P-256",), "EC-P-256", 256),
    (("EC", None, "P-384"), "EC-P-384", 384),
    (("ECDSA", 256), "EC-P-256", 256),
    (("Ed25519",), "Ed25519", 256),
    (("RSA-4096",), "RSA-4096", 4096),
    (("HMAC-SHA256",), "HMAC-SHA256", 256),
    (("hmac-sha-512",), "HMAC-SHA512", 512),
])
def test_approved_specs(args: tuple[object, ...], label: str, size: int) -> None:
    spec = key_spec(*args)  # type: ignore[arg-type]
    assert (spec.label, spec.size) == (label, size)


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"algorithm": "DES"}, "algorithm_not_approved"),
    ({"algorithm": "HMAC-SHA1"}, "algorithm_not_approved"),
    ({"algorithm": "EC", "curve": "secp256k1"}, "algorithm_not_approved"),
    ({"algorithm": "RSA", "size": 1024}, "key_size_below_minimum"),
    ({"algorithm": "RSA-1024"}, "key_size_below_minimum"),
    ({"algorithm": "EC", "curve": "P-192"}, "key_size_below_minimum"),
    ({"algorithm": "RSA", "size": 2049}, "key_size_invalid"),
    ({"algorithm": "AES", "size": 64}, "key_size_below_minimum"),
    ({"algorithm": "AES-256", "usages": ["sign"]}, "usage_not_permitted"),
    ({"algorithm": "Ed25519", "usages": ["encrypt"]}, "usage_not_permitted"),
    ({"algorithm": "RSA", "usages": ["sign", "decrypt"]}, "usage_not_permitted"),
    ({"algorithm": "AES", "usages": ["teleport"]}, "usage_not_permitted"),
    ({"algorithm": "AES", "curve": "P-256"}, "key_size_invalid"),
])
def test_rejected_specs(kwargs: dict[str, object], code: str) -> None:
    with pytest.raises(KlmError) as info:
        key_spec(**kwargs)  # type: ignore[arg-type]
    assert info.value.code == code


def test_default_usages_and_classes() -> None:
    assert key_spec("AES-256").usages == {Usage.ENCRYPT, Usage.DECRYPT}
    assert key_spec("EC-P-256").key_class is KeyClass.ASYMMETRIC
    assert key_spec("HMAC-SHA384").algorithm is Algorithm.HMAC_SHA384
    assert key_spec("HMAC-SHA384").key_class is KeyClass.SECRET
