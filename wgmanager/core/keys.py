"""WireGuard key values: parsing, encoding and derivation, with secrets kept out of reprs.

A private key object never renders its bytes through repr/str/format, so it cannot reach a
log line or an exception message by accident; the only ways out are the explicit
``export_base64`` / ``export_hex`` used by the key file writer and the device backends.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random as nacl_random

KEY_LEN = 32

# Curve25519 points of small order (little-endian u-coordinates, top bit ignored): the list
# libsodium rejects (has_small_order). No Diffie-Hellman with them yields a usable secret,
# so a peer with such a key never completes a handshake: "configured" but dark forever.
_LOW_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # 0
    "0100000000000000000000000000000000000000000000000000000000000000",  # 1
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",  # order 8
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1
))


def is_low_order(raw: bytes) -> bool:
    """Whether a public key is a small-order point (or the all-zero key)."""
    return raw[:31] + bytes([raw[31] & 0x7F]) in _LOW_ORDER


class InvalidKey(ValueError):
    """A key string that is not 32 bytes of standard base64 (or hex on the UAPI socket)."""


def _decode_base64(text: str) -> bytes:
    stripped = text.strip()
    if not stripped:
        raise InvalidKey("empty key")
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("not valid base64") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"decodes to {len(raw)} bytes, a WireGuard key has {KEY_LEN}")
    return raw


@dataclass(frozen=True, slots=True, order=True)
class PublicKey:
    """A Curve25519 public key; renders as base64, the way `wg` prints it."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise InvalidKey(f"a WireGuard key has {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        raw = _decode_base64(text)
        if raw == bytes(KEY_LEN):
            raise InvalidKey("all-zero key")
        if is_low_order(raw):
            raise InvalidKey("a low-order Curve25519 point: no handshake with it can ever "
                             "complete (a forged or broken key)")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidKey("not a 64-digit hex key") from None

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def hex(self) -> str:
        return self.raw.hex()

    def short(self) -> str:
        """First 8 base64 characters: enough to tell keys apart in a table."""
        return self.base64()[:8]

    def __str__(self) -> str:
        return self.base64()

    def __repr__(self) -> str:
        return f"PublicKey({self.base64()!r})"


class PrivateKey:
    """A Curve25519 private key that refuses to show itself."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise InvalidKey(f"a WireGuard key has {KEY_LEN} bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(_clamp(nacl_random(KEY_LEN)))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode_base64(text))

    @classmethod
    def from_hex(cls, text: str) -> PrivateKey:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidKey("not a 64-digit hex key") from None

    @property
    def public_key(self) -> PublicKey:
        # X25519 clamps the scalar itself, so clamped and unclamped forms give the same key.
        return PublicKey(crypto_scalarmult_base(self._raw))

    def export_base64(self) -> str:
        """The key file format (`wg genkey`). Only the key store and backends call this."""
        return base64.b64encode(self._raw).decode("ascii")

    def export_hex(self) -> str:
        """The UAPI socket format. Only the userspace backend calls this."""
        return self._raw.hex()

    def export_raw(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self.public_key)

    def __repr__(self) -> str:
        return f"PrivateKey(<redacted>, public={self.public_key.base64()!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("private keys are not picklable")


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)
