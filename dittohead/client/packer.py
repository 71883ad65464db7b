"""The client's side of packs: chunks the server lacks, streamed into packs in a staging folder.

Imported only when a sync has something to read: a sync with nothing to send never loads it.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

from dittohead import format as fmt
from dittohead import pack
from dittohead.chunking import Chunk
from dittohead.client import cache as cc
from dittohead.client.transport import Transport, Upload
from dittohead.errors import TransportError


class Packer:
    """Streams chunks the server lacks into packs in the staging folder, one pack at a time."""

    def __init__(self, t: Transport, cache: cc.StateCache, study: str, name: str,
                 skip: set[bytes], dry_run: bool, staging_exists: bool) -> None:
        self.t, self.cache, self.study, self.name = t, cache, study, name
        self.skip = skip
        self.dry_run = dry_run
        self.staging_exists = staging_exists
        self.upload: Upload | None = None
        self.writer: pack.PackWriter | None = None
        self.bytes_sent = 0
        # Each finished pack is fsynced and renamed in the background while the next one fills;
        # at most one is in flight, and it is recorded as staged only once it is complete.
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: tuple[Future[None], Upload, str, int, bytes] | None = None

    def offer(self, chunk: Chunk) -> None:
        if chunk.id in self.skip:
            return
        self.skip.add(chunk.id)
        if self.dry_run:
            self.bytes_sent += chunk.length
            return
        try:
            if self.writer is None:
                self.ensure_staging()
                self.upload = self.t.open_upload(self.study, self.name)
                self.writer = pack.PackWriter(self.upload)
            self.writer.add(chunk.id, chunk.data)
            if self.writer.full():
                self.flush()
        except OSError as e:  # not a source file's fault: it must not read as one
            raise _write_error(e) from e

    def ensure_staging(self) -> None:
        if not self.staging_exists:
            self.cache.set_state(self.name, cc.STAGING, time.time_ns())
            self.t.make_staging(self.study, self.name)
            self.staging_exists = True

    def flush(self, wait: bool = False) -> None:
        """Finish the current pack (in the background); with ``wait``, every pack is complete."""
        try:
            if self.writer is not None and self.upload is not None:
                self._settle()  # the previous pack is recorded before anything of this one can fail
                pid, size = self.writer.finish()
                filename = pid.hex() + fmt.PACK_SUFFIX
                ids = b"".join(e.id for e in self.writer.entries)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="dittohead-upload")
                self._inflight = (self._pool.submit(self.upload.finish, filename), self.upload, filename, size, ids)
                self.upload, self.writer = None, None
            if wait:
                self._settle()
        except OSError as e:
            raise _write_error(e) from e

    def _settle(self) -> None:
        if self._inflight is None:
            return
        fut, upload, filename, size, ids = self._inflight
        self._inflight = None
        try:
            fut.result()
        except BaseException:
            upload.abort()  # its temporary file: a pack that never became complete
            raise
        self.cache.add_staged(self.name, filename, size, ids)
        self.bytes_sent += size

    def abort(self) -> None:
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                self._settle()
        if self.upload is not None:
            self.upload.abort()
            self.upload, self.writer = None, None
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _write_error(e: OSError) -> TransportError:
    return TransportError(f"cannot write to the drop box: {e.strerror or e}")
