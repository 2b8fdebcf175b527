"""The checksummed trailer every stored KV block carries (disk tier G3 and shared tier G4).

  magic "KVBM" | version | xxh3-64 checksum of the data | 16-byte block identity | 16-byte layout fingerprint

The fingerprint names the model, dtype, geometry, block size and tensor-parallel rank that computed the block;
the identity names the engine's block hash. A block whose trailer, identity, fingerprint or checksum does not
match is a miss (recomputed), never data.

Operations:
  block_identity(block_hash)           16 bytes for a block hash of any type (vLLM's are bytes)
  checksum(pieces)                     xxh3-64 over buffers taken back to back
  pack(pieces, block_hash, fp)         the TRAILER.size bytes that seal a block
  check(trailer, block_hash, fp, sum)  None when it matches, else why not (for a log line)
"""

from __future__ import annotations

import struct
from typing import Hashable, Sequence

import xxhash

TRAILER = struct.Struct("<4sIQ16s16s")  # magic, version, checksum, block identity, fingerprint
MAGIC = b"KVBM"
VERSION = 1


def block_identity(block_hash: Hashable) -> bytes:
    """16 bytes identifying a block hash of any type (vLLM's are bytes)."""
    raw = block_hash if isinstance(block_hash, bytes) else repr(block_hash).encode()
    return xxhash.xxh3_128_digest(raw)


def checksum(pieces: Sequence) -> int:
    """xxh3-64 of the buffers in `pieces` taken back to back."""
    digest = xxhash.xxh3_64()
    for piece in pieces:
        digest.update(piece)
    return digest.intdigest()


def pack(pieces: Sequence, block_hash: Hashable, fingerprint: bytes) -> bytes:
    """The trailer sealing a block made of `pieces`."""
    return TRAILER.pack(MAGIC, VERSION, checksum(pieces), block_identity(block_hash), fingerprint)


def check(trailer, block_hash: Hashable, fingerprint: bytes, data_checksum: int | None = None) -> str | None:
    """None when `trailer` (a TRAILER.size buffer) names this block, fingerprint and checksum; else the reason."""
    magic, version, stored, ident, fp = TRAILER.unpack_from(trailer, 0)
    if magic != MAGIC or version != VERSION:
        return "no valid trailer"
    if fp != fingerprint:
        return "another model or layout (fingerprint)"
    if ident != block_identity(block_hash):
        return "another block (identity)"
    if data_checksum is not None and data_checksum != stored:
        return "checksum mismatch"
    return None


def stored_checksum(trailer) -> int:
    """The checksum field of a trailer."""
    return TRAILER.unpack_from(trailer, 0)[2]
