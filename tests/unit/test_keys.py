"""Key values: parsing, encoding, derivation, and private keys that never show themselves."""

from __future__ import annotations

import base64
import copy
import logging
import pickle

import nacl.public
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmanager.core.keys import KEY_LEN, InvalidKey, PrivateKey, PublicKey

from .strategies import PROPERTY, b64, private_keys, raw_keys

# `wg genkey` / `wg pubkey` pair, fixed so the derivation is checked against WireGuard's tools.
WG_PRIVATE = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
WG_PUBLIC = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="


def clamp(raw: bytes) -> bytes:
    """RFC 7748 clamping, written out here independently of the module under test."""
    b = bytearray(raw)
    b[0] &= 0b1111_1000
    b[31] &= 0b0111_1111
    b[31] |= 0b0100_0000
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# parsing and encoding


class TestPublicKeyEncoding:
    @given(raw_keys)
    @PROPERTY
    def test_base64_round_trip(self, raw: bytes) -> None:
        key = PublicKey(raw)
        text = key.base64()
        assert len(text) == 44 and text.endswith("=")
        assert text == b64(raw)
        assert PublicKey.from_base64(text) == key
        assert str(key) == text

    @given(raw_keys)
    @PROPERTY
    def test_hex_round_trip(self, raw: bytes) -> None:
        key = PublicKey(raw)
        assert key.hex() == raw.hex()
        assert PublicKey.from_hex(key.hex()) == key
        assert PublicKey.from_hex(key.hex().upper()) == key

    def test_known_value(self) -> None:
        key = PublicKey.from_base64(WG_PUBLIC)
        assert key.base64() == WG_PUBLIC
        assert key.short() == WG_PUBLIC[:8]
        assert repr(key) == f"PublicKey({WG_PUBLIC!r})"
        assert PublicKey.from_hex(key.hex()) == key

    @pytest.mark.parametrize("text", [
        f" {WG_PUBLIC}", f"{WG_PUBLIC}\n", f"\t{WG_PUBLIC} \r\n",
    ])
    def test_surrounding_whitespace_is_ignored(self, text: str) -> None:
        # annotations and key files often carry a trailing newline
        assert PublicKey.from_base64(text).base64() == WG_PUBLIC

    @given(raw_keys, raw_keys)
    @PROPERTY
    def test_equality_hash_and_order_follow_the_bytes(self, a: bytes, b: bytes) -> None:
        ka, kb = PublicKey(a), PublicKey(b)
        assert (ka == kb) == (a == b)
        if a == b:
            assert hash(ka) == hash(kb)
        assert (ka < kb) == (a < b)
        assert len({ka, kb, PublicKey(a)}) == len({a, b})

    def test_is_immutable(self) -> None:
        key = PublicKey.from_base64(WG_PUBLIC)
        with pytest.raises(AttributeError):
            key.raw = bytes(KEY_LEN)  # type: ignore[misc]


class TestRejectedKeys:
    """Every rejection is an InvalidKey (a ValueError) with a reason an operator can act on."""

    @pytest.mark.parametrize(("text", "reason"), [
        pytest.param("", "empty key", id="empty"),
        pytest.param("   \n", "empty key", id="whitespace-only"),
        pytest.param("not a key at all!", "not valid base64", id="garbage"),
        pytest.param(WG_PUBLIC[:-1], "not valid base64", id="missing-padding"),
        pytest.param(WG_PUBLIC[:20] + " " + WG_PUBLIC[20:], "not valid base64",
                     id="inner-space"),
        pytest.param(WG_PRIVATE.replace("+", "-"), "not valid base64", id="urlsafe-alphabet"),
        pytest.param("é" * 44, "not valid base64", id="non-ascii"),
        pytest.param(WG_PUBLIC.removesuffix("=") + "==", "not valid base64", id="extra-padding"),
        pytest.param(b64(bytes(range(1, 32))), "decodes to 31 bytes, a WireGuard key has 32",
                     id="31-bytes"),
        pytest.param(b64(bytes(range(1, 34))), "decodes to 33 bytes, a WireGuard key has 32",
                     id="33-bytes"),
        pytest.param(b64(b"\x01" * 64), "decodes to 64 bytes", id="64-bytes"),
        pytest.param(b64(b"\x01"), "decodes to 1 bytes", id="1-byte"),
        pytest.param(b64(bytes(KEY_LEN)), "all-zero key", id="all-zero"),
    ])
    def test_public_from_base64(self, text: str, reason: str) -> None:
        with pytest.raises(InvalidKey, match=reason) as info:
            PublicKey.from_base64(text)
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize(("text", "reason"), [
        pytest.param("", "empty key", id="empty"),
        pytest.param("%%%", "not valid base64", id="garbage"),
        pytest.param(b64(bytes(range(1, 32))), "decodes to 31 bytes", id="31-bytes"),
        pytest.param(b64(bytes(range(1, 34))), "decodes to 33 bytes", id="33-bytes"),
    ])
    def test_private_from_base64(self, text: str, reason: str) -> None:
        with pytest.raises(InvalidKey, match=reason):
            PrivateKey.from_base64(text)

    @pytest.mark.parametrize("text", [
        pytest.param("", id="empty"),
        pytest.param("00" * 31, id="31-bytes"),
        pytest.param("00" * 33, id="33-bytes"),
        pytest.param("0" * 63, id="odd-digits"),
        pytest.param("zz" * 32, id="not-hex"),
        pytest.param(WG_PUBLIC, id="base64-instead"),
    ])
    @pytest.mark.parametrize("cls", [PublicKey, PrivateKey])
    def test_from_hex(self, cls: type[PublicKey] | type[PrivateKey], text: str) -> None:
        with pytest.raises(InvalidKey, match="not a 64-digit hex key"):
            cls.from_hex(text)

    @pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
    @pytest.mark.parametrize("cls", [PublicKey, PrivateKey])
    def test_constructor_wrong_length(self, cls: type[PublicKey] | type[PrivateKey],
                                      length: int) -> None:
        with pytest.raises(InvalidKey, match=f"a WireGuard key has 32 bytes, got {length}"):
            cls(b"\x01" * length)

    def test_private_key_errors_never_quote_the_input(self) -> None:
        secret = b64(bytes(range(1, 34)))  # a would-be key, one byte too long
        with pytest.raises(InvalidKey) as info:
            PrivateKey.from_base64(secret)
        assert secret not in str(info.value)
        with pytest.raises(InvalidKey) as info:
            PrivateKey.from_hex(bytes(range(33)).hex())
        assert bytes(range(33)).hex() not in str(info.value)


# ---------------------------------------------------------------------------------------------
# private keys: derivation


class TestDerivation:
    def test_known_wg_pair(self) -> None:
        assert PrivateKey.from_base64(WG_PRIVATE).public_key == PublicKey.from_base64(WG_PUBLIC)

    @given(st.binary(min_size=KEY_LEN, max_size=KEY_LEN))
    @PROPERTY
    def test_matches_nacl(self, raw: bytes) -> None:
        expected = bytes(nacl.public.PrivateKey(raw).public_key)
        assert PrivateKey(raw).public_key.raw == expected

    @given(st.binary(min_size=KEY_LEN, max_size=KEY_LEN))
    @PROPERTY
    def test_clamping_does_not_change_the_public_key(self, raw: bytes) -> None:
        assert PrivateKey(clamp(raw)).public_key == PrivateKey(raw).public_key

    def test_generate_gives_clamped_distinct_keys(self) -> None:
        keys = [PrivateKey.generate() for _ in range(32)]
        for key in keys:
            raw = key.export_raw()
            assert len(raw) == KEY_LEN
            assert raw == clamp(raw)
        assert len({k.export_raw() for k in keys}) == len(keys)
        assert len({k.public_key for k in keys}) == len(keys)

    @given(private_keys)
    @PROPERTY
    def test_exports_round_trip(self, key: PrivateKey) -> None:
        raw = key.export_raw()
        assert key.export_base64() == b64(raw)
        assert key.export_hex() == raw.hex()
        assert PrivateKey.from_base64(key.export_base64()) == key
        assert PrivateKey.from_hex(key.export_hex()) == key
        assert PrivateKey(raw).public_key == key.public_key

    @given(private_keys, private_keys)
    @PROPERTY
    def test_equality_and_hash(self, a: PrivateKey, b: PrivateKey) -> None:
        assert (a == b) == (a.export_raw() == b.export_raw())
        assert a == PrivateKey(a.export_raw())
        assert hash(a) == hash(PrivateKey(a.export_raw()))
        assert a != a.public_key
        assert a != a.export_raw()


# ---------------------------------------------------------------------------------------------
# private keys: no way out by accident


def secret_forms(key: PrivateKey) -> list[str]:
    raw = key.export_raw()
    std = base64.b64encode(raw).decode()
    return [
        std,
        std.rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        raw.hex().upper(),
        repr(raw),
        str(list(raw)),
    ]


def renderings(key: PrivateKey) -> list[str]:
    return [
        repr(key),
        str(key),
        format(key),
        format(key, ""),
        f"{key}",
        f"{key!r}",
        f"{key!s}",
        f"{key!a}",
        "{}".format(key),  # noqa: UP032 - str.format is a distinct path
        "%s %r" % (key, key),  # noqa: UP031 - %-formatting is a distinct path
        repr([key]),
        repr({"key": key}),
        repr((key,)),
        ascii(key),
    ]


class TestPrivateKeyStaysSecret:
    @given(private_keys)
    @PROPERTY
    def test_no_rendering_contains_the_secret(self, key: PrivateKey) -> None:
        rendered = renderings(key)
        for text in rendered:
            for secret in secret_forms(key):
                assert secret not in text

    @given(private_keys)
    @PROPERTY
    def test_repr_names_the_public_key_only(self, key: PrivateKey) -> None:
        assert repr(key) == f"PrivateKey(<redacted>, public={key.public_key.base64()!r})"
        assert str(key) == repr(key)

    def test_format_spec_fails_without_leaking(self) -> None:
        key = PrivateKey.generate()
        with pytest.raises(TypeError) as info:
            format(key, ">80")
        for secret in secret_forms(key):
            assert secret not in str(info.value)

    def test_has_no_instance_dict(self) -> None:
        key = PrivateKey.generate()
        assert not hasattr(key, "__dict__")

    def test_logging_does_not_leak(self, caplog: pytest.LogCaptureFixture) -> None:
        key = PrivateKey.generate()
        with caplog.at_level(logging.INFO):
            logging.getLogger("test").info("key %s / %r", key, key)
            logging.getLogger("test").info("key", extra={"key": key})
            logging.getLogger("test").info(key)
        for secret in secret_forms(key):
            assert secret not in caplog.text

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_not_picklable(self, protocol: int) -> None:
        key = PrivateKey.generate()
        with pytest.raises(TypeError, match="not picklable"):
            pickle.dumps(key, protocol=protocol)
        with pytest.raises(TypeError, match="not picklable"):
            pickle.dumps([key], protocol=protocol)

    @pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy])
    def test_not_copyable_either(self, duplicate: object) -> None:
        # copy goes through the same __reduce__ path, so secrets are never silently cloned
        with pytest.raises(TypeError, match="not picklable"):
            duplicate(PrivateKey.generate())  # type: ignore[operator]


class TestWeakPublicKeys:
    """Small-order points: 'configured' peers that can never complete a handshake."""

    LOW_ORDER = (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )

    @pytest.mark.parametrize("hexkey", LOW_ORDER)
    @pytest.mark.parametrize("top_bit", [False, True])
    def test_low_order_points_are_rejected_with_the_reason(self, hexkey: str,
                                                           top_bit: bool) -> None:
        raw = bytearray(bytes.fromhex(hexkey))
        if top_bit:  # X25519 ignores the top bit: the same point
            raw[31] |= 0x80
        with pytest.raises(InvalidKey, match="low-order"):
            PublicKey.from_base64(b64(bytes(raw)))

    @given(st.one_of(raw_keys, st.sampled_from([bytes.fromhex(h) for h in LOW_ORDER])))
    @PROPERTY
    def test_rejected_exactly_when_libsodium_refuses_the_point(self, raw: bytes) -> None:
        """libsodium (via PyNaCl) is the oracle: X25519 with a small-order point fails."""
        import nacl.bindings

        try:
            nacl.bindings.crypto_scalarmult(bytes([9]) * KEY_LEN, raw)
            usable = True
        except RuntimeError:
            usable = False
        try:
            PublicKey.from_base64(b64(raw))
            accepted = True
        except InvalidKey:
            accepted = False
        assert accepted == usable
