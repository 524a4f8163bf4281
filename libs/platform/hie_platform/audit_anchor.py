"""Signed checkpoints of an audit chain: the chain's head anchored outside the database.

A hash chain alone shows that a record was altered in place, but not that the newest records were
deleted (a shorter chain is still a valid chain) nor that a record was altered and every later hash
recomputed. A checkpoint states "the chain of hub H had ``count`` records, the newest at ``sequence``
with hash ``head_hash``, at ``issued_at``", signed with the hub's Ed25519 checkpoint key and
published to a second store (JetStream, stream HIE_AUDIT). Someone who can write the hub's database
but does not hold the key cannot make a checkpoint agree with a truncated or rewritten chain.

What is signed: the bytes ``hie-audit-checkpoint:1\\n`` followed by the JSON object of the fields
``hub``, ``node``, ``sequence``, ``head_hash``, ``count``, ``issued_at`` (ISO 8601, UTC, microseconds,
``Z``) and ``key_id``, keys sorted, no spaces, UTF-8. ``key_id`` is the first 16 hex digits of the
SHA-256 of the raw 32-byte public key; the signature travels as unpadded base64url.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hie_schemas.events import AuditCheckpoint

SIGNING_CONTEXT = b"hie-audit-checkpoint:1\n"


def utc_text(value: datetime) -> str:
    """A time as the one text that is hashed and signed: UTC, microseconds, ``Z`` (naive = UTC)."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The hub's checkpoint public key from a PEM file (``<key file>.pub``, written by the hub)."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key at ``path`` (PKCS#8 PEM); created with mode 0600 if missing, and its
    public key written beside it as ``<path>.pub`` for the verifiers. Several processes of one hub
    starting at once (HIE_HUB_WORKERS) end with the same key: the file appears whole or not at all,
    and the first one written wins."""
    if not path.exists():
        _create_key_file(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    public = path.with_name(path.name + ".pub")
    pem_public = public_pem(key.public_key())
    if not public.exists() or public.read_bytes() != pem_public:
        _write_whole(public, pem_public)
    return key


def _create_key_file(path: Path) -> None:
    """A new key written to a temporary file (0600) and linked into place, which fails if another
    process linked its key first (that key is then the one everybody loads)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def _write_whole(path: Path, data: bytes) -> None:
    """Replace ``path`` at once, so that a reader never sees it half written. The file is created
    with mode 0666 less the process's umask, as ``Path.write_bytes`` would (``hie up`` runs with 077:
    nothing in its data directory is readable by others, tests/attacks/test_local_run.py)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def signed_bytes(checkpoint: AuditCheckpoint) -> bytes:
    body = {
        "hub": checkpoint.hub,
        "node": checkpoint.node,
        "sequence": checkpoint.sequence,
        "head_hash": checkpoint.head_hash,
        "count": checkpoint.count,
        "issued_at": utc_text(checkpoint.issued_at),
        "key_id": checkpoint.key_id,
    }
    return SIGNING_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class CheckpointSigner:
    """Makes the signed checkpoints of one hub's chain."""

    def __init__(self, key: Ed25519PrivateKey, hub: str, node: str) -> None:
        self.key = key
        self.hub = hub
        self.node = node
        self.key_id = key_id(key.public_key())

    def sign(self, sequence: int, head_hash: str, count: int) -> AuditCheckpoint:
        unsigned = AuditCheckpoint(
            hub=self.hub,
            node=self.node,
            sequence=sequence,
            head_hash=head_hash,
            count=count,
            issued_at=datetime.now(UTC),
            key_id=self.key_id,
            signature="",
        )
        signature = base64.urlsafe_b64encode(self.key.sign(signed_bytes(unsigned))).rstrip(b"=").decode()
        return unsigned.model_copy(update={"signature": signature})


def signature_valid(checkpoint: AuditCheckpoint, public: Ed25519PublicKey) -> bool:
    """True if the checkpoint was signed by the private half of ``public`` and not altered since."""
    try:
        raw = base64.urlsafe_b64decode(checkpoint.signature + "=" * (-len(checkpoint.signature) % 4))
        public.verify(raw, signed_bytes(checkpoint))
    except (InvalidSignature, ValueError):
        return False
    return checkpoint.key_id == key_id(public)
