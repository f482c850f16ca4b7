"""The node's identity: one Ed25519 key, kept on disk, that signs every window statement.

The key file is PKCS#8 PEM, created with mode 0600 in a directory created with mode 0700, and refused
when group or others can access it (as ssh does): a readable key lets anyone sign as this node. The
node id is derived from the public key unless the operator assigns one; the public key is exported
as base64 of its raw 32 bytes, the form ComputeNode.spec.publicKey holds.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from consortium.verification import signing

__all__ = ["NodeIdentity", "UnsafeKeyFile"]


class UnsafeKeyFile(PermissionError):
    """The key file can be read or written by group or others."""


@dataclass(frozen=True)
class NodeIdentity:
    private_key: signing.Ed25519PrivateKey
    node_id: str

    @classmethod
    def load_or_create(cls, path: str | os.PathLike, node_id: str | None = None) -> "NodeIdentity":
        p = Path(path)
        if p.exists():
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                raise UnsafeKeyFile(f"{p} has mode {mode:04o}; the node key must be 0600 or stricter")
            key = _ed25519_key(p.read_bytes(), str(p))
        else:
            key = signing.generate_private_key()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            # exist_ok: agents sharing a key folder start at once, and the check-then-create raced.
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_EXCL: two agents starting at once must not both write a key and disagree about it.
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.chmod(p, 0o600)  # the umask may have narrowed it; never wider than 0600
        return cls(key, node_id or signing.node_id_for(key))

    @classmethod
    def from_pem(cls, pem: bytes, node_id: str, source: str = "the key") -> "NodeIdentity":
        """An identity from PEM text held elsewhere (an environment variable filled from a Secret)."""
        return cls(_ed25519_key(pem, source), node_id)

    @property
    def public_key_text(self) -> str:
        return signing.public_key_text(self.private_key)

    def sign(self, message: bytes) -> bytes:
        return signing.sign(self.private_key, message)


def _ed25519_key(pem: bytes, source: str) -> signing.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, signing.Ed25519PrivateKey):
        raise ValueError(f"{source} does not hold an Ed25519 key")
    return key
