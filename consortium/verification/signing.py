"""Ed25519 keys and the byte encoding of everything that gets signed.

Signed statements are encoded as a sequence of fields, each a 4-byte little-endian length followed by
the field's bytes: strings as UTF-8, integers as 8-byte little-endian unsigned, digests raw. The first
field is a domain string naming the statement kind and version, so a signature over one kind of
statement can never be replayed as another. The encoding is unambiguous without any parser.

Public keys travel as base64 of the raw 32 bytes (fits a Kubernetes resource field); a node id
derived from a key is "node-" + the first 16 hex digits of SHA-256(raw key).
"""
from __future__ import annotations

import base64
import hashlib
import struct
from typing import Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "Ed25519PrivateKey", "Ed25519PublicKey", "PublicKeyLike", "generate_private_key", "public_key",
    "public_key_bytes", "public_key_text", "node_id_for", "sign", "verify_signature", "encode_fields",
]

PublicKeyLike = Union[Ed25519PublicKey, bytes, str]


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key(key: PublicKeyLike | Ed25519PrivateKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, raw 32 bytes, or base64 text of them."""
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str):
        key = base64.b64decode(key.strip(), validate=True)
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError("an Ed25519 public key is 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(bytes(key))


def public_key_bytes(key: PublicKeyLike | Ed25519PrivateKey) -> bytes:
    return public_key(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: PublicKeyLike | Ed25519PrivateKey) -> str:
    return base64.b64encode(public_key_bytes(key)).decode("ascii")


def node_id_for(key: PublicKeyLike | Ed25519PrivateKey) -> str:
    # A valid Kubernetes object name, stable for the key's life.
    return "node-" + hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    return private_key.sign(message)


def verify_signature(key: PublicKeyLike, message: bytes, signature: bytes) -> bool:
    try:
        public_key(key).verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def encode_fields(domain: str, *fields: Union[str, int, bytes]) -> bytes:
    """Length-prefixed encoding: each field (domain first) as u32le length + bytes."""
    out = bytearray()
    for f in (domain, *fields):
        if isinstance(f, bool):
            raise TypeError("booleans are not a field type")
        if isinstance(f, int):
            if not 0 <= f < 2**64:
                raise ValueError(f"integer field out of u64 range: {f}")
            b = struct.pack("<Q", f)
        elif isinstance(f, str):
            b = f.encode("utf-8")
        elif isinstance(f, (bytes, bytearray)):
            b = bytes(f)
        else:
            raise TypeError(f"unsupported field type {type(f).__name__}")
        out += struct.pack("<I", len(b)) + b
    return bytes(out)
