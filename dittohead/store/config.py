"""The store's config: format version, chunking parameters, store id (JSON, human-readable).

Written once by ``init``; checked on every open, so that a store is never used by a build that
speaks another format or would cut files differently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from dittohead import format as fmt
from dittohead.errors import StoreError, UnsupportedFormat


@dataclass(frozen=True)
class StoreConfig:
    version: int
    store_id: str
    chunking: dict

    @classmethod
    def new(cls) -> StoreConfig:
        return cls(fmt.FORMAT_VERSION, os.urandom(16).hex(), fmt.chunking_params())

    def encode(self) -> bytes:
        doc = {"kind": fmt.CONFIG_KIND, "version": self.version, "id": self.store_id,
               "chunking": self.chunking, "hash": fmt.HASH_NAME}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, *, where: str) -> StoreConfig:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{where}: not a valid store config ({e})") from None
        if not isinstance(doc, dict) or doc.get("kind") != fmt.CONFIG_KIND:
            raise StoreError(f"{where}: not a dittohead store config")
        version = doc.get("version")
        if version not in fmt.SUPPORTED_VERSIONS:
            raise UnsupportedFormat(f"{where}: store format version {version!r} is not supported by this dittohead")
        if doc.get("chunking") != fmt.chunking_params() or doc.get("hash") != fmt.HASH_NAME:
            raise UnsupportedFormat(
                f"{where}: chunking parameters {doc.get('chunking')!r} differ from this dittohead's "
                f"{fmt.chunking_params()!r}"
            )
        sid = doc.get("id")
        if not isinstance(sid, str) or not sid:
            raise StoreError(f"{where}: store id missing")
        return cls(version, sid, doc["chunking"])
