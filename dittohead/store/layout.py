"""The server root: where everything lives, with which mode (docs/server-root.md).

    ROOT/store/                 0700  config, packs/, manifests/, studies/, index.sqlite, quarantine/
    ROOT/dropbox/NAME/          0711
        inbox/                  3733  setgid + sticky: uploaders create, cannot list or touch others'
        have/                   0755  have-segments, read by clients
        receipts/               0711  one receipt per ingested submission, readable by name
        processing/ done/ failed/  0700
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass

from dittohead import format as fmt
from dittohead import fsutil
from dittohead.errors import NotFound, StoreError, UsageError
from dittohead.store.config import StoreConfig

STORE_MODE = 0o700
DROPBOX_MODE = 0o755
STUDY_MODE = 0o711
INBOX_MODE = 0o3733
HAVE_MODE = 0o755
RECEIPTS_MODE = 0o711
PRIVATE_MODE = 0o700


@dataclass(frozen=True)
class StudyDropbox:
    """One study's drop box: the protocol between clients and the ingest."""

    path: str
    name: str

    @property
    def inbox(self) -> str:
        return os.path.join(self.path, "inbox")

    @property
    def have(self) -> str:
        return os.path.join(self.path, "have")

    @property
    def receipts(self) -> str:
        return os.path.join(self.path, "receipts")

    @property
    def processing(self) -> str:
        return os.path.join(self.path, "processing")

    @property
    def done(self) -> str:
        return os.path.join(self.path, "done")

    @property
    def failed(self) -> str:
        return os.path.join(self.path, "failed")

    def folders(self) -> list[tuple[str, int]]:
        return [
            (self.path, STUDY_MODE),
            (self.inbox, INBOX_MODE),
            (self.have, HAVE_MODE),
            (self.receipts, RECEIPTS_MODE),
            (self.processing, PRIVATE_MODE),
            (self.done, PRIVATE_MODE),
            (self.failed, PRIVATE_MODE),
        ]


@dataclass(frozen=True)
class StudySettings:
    name: str
    export: str | None = None
    notify: tuple[str, ...] = ()


def check_study_name(name: str) -> str:
    if not fmt.STUDY_NAME_RE.match(name):
        raise UsageError(
            f"bad study name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class ServerRoot:
    """Paths of a server root; creating one, adding studies, checking modes."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    # -- paths
    @property
    def store(self) -> str:
        return os.path.join(self.path, "store")

    @property
    def config_path(self) -> str:
        return os.path.join(self.store, "config")

    @property
    def index_path(self) -> str:
        return os.path.join(self.store, "index.sqlite")

    @property
    def quarantine(self) -> str:
        return os.path.join(self.store, "quarantine")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.store, "lock")

    @property
    def dropbox_root(self) -> str:
        return os.path.join(self.path, "dropbox")

    def settings_path(self, study: str) -> str:
        return os.path.join(self.store, "studies", f"{study}.json")

    def dropbox(self, study: str) -> StudyDropbox:
        check_study_name(study)
        return StudyDropbox(os.path.join(self.dropbox_root, study), study)

    # -- reading
    def is_initialised(self) -> bool:
        return os.path.isfile(self.config_path)

    def config(self) -> StoreConfig:
        if not os.path.isdir(self.path):
            raise StoreError(f"{self.path}: no such server root")
        try:
            os.stat(self.config_path)
        except PermissionError:
            raise StoreError(f"{self.store}: permission denied (the store is the daemon's account's "
                             "alone: run this as that account)") from None
        except OSError:
            raise StoreError(f"{self.path}: not a dittohead server root (no store/config; run 'dittohead init')") from None
        if not self.is_initialised():
            raise StoreError(f"{self.path}: not a dittohead server root (store/config is not a file)")
        try:
            data = fsutil.read_limited(self.config_path, fmt.CONFIG_MAX_SIZE)
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.config_path}: cannot read ({e})") from None
        return StoreConfig.decode(data, where=self.config_path)

    def studies(self) -> list[str]:
        if not os.path.isdir(self.dropbox_root):
            return []
        return sorted(n for n in os.listdir(self.dropbox_root) if fmt.STUDY_NAME_RE.match(n)
                      and os.path.isdir(os.path.join(self.dropbox_root, n)))

    def has_work(self) -> bool:
        """Is anything committed in an inbox, or left in processing/ by an interrupted ingest?"""
        for study in self.studies():
            box = self.dropbox(study)
            for folder in (box.processing, box.inbox):
                with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
                    if any(folder == box.processing or not e.name.startswith(fmt.STAGING_PREFIX) for e in it):
                        return True
        return False

    def require_study(self, study: str) -> StudyDropbox:
        box = self.dropbox(study)
        if not os.path.isdir(box.path):
            raise NotFound(f"no study {study!r} in {self.path} (add it with 'dittohead study add')")
        return box

    def study_settings(self, study: str) -> StudySettings:
        path = self.settings_path(study)
        try:
            doc = json.loads(fsutil.read_limited(path, fmt.CONFIG_MAX_SIZE))
            return StudySettings(study, doc.get("export"), tuple(doc.get("notify", ())))
        except FileNotFoundError:
            return StudySettings(study)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: bad study settings ({e})") from None

    # -- creating
    def init(self) -> StoreConfig:
        if self.is_initialised():
            raise UsageError(f"{self.path}: already a dittohead server root")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"{self.path}: exists and is not a folder")
        if os.path.isdir(self.path) and os.listdir(self.path):
            raise UsageError(f"{self.path}: folder is not empty")
        os.makedirs(self.path, exist_ok=True)
        for sub, mode in self.folders():
            _mkdir(sub, mode)
        cfg = StoreConfig.new()
        fsutil.write_new(self.config_path, cfg.encode(), mode=0o600)
        fsutil.fsync_dir(self.path)
        return cfg

    def folders(self) -> list[tuple[str, int]]:
        return [
            (self.store, STORE_MODE),
            (os.path.join(self.store, "packs"), PRIVATE_MODE),
            (os.path.join(self.store, "manifests"), PRIVATE_MODE),
            (os.path.join(self.store, "studies"), PRIVATE_MODE),
            (os.path.join(self.store, "tmp"), PRIVATE_MODE),
            (self.quarantine, PRIVATE_MODE),
            (self.dropbox_root, DROPBOX_MODE),
        ]

    def add_study(self, settings: StudySettings) -> StudyDropbox:
        self.config()
        box = self.dropbox(settings.name)
        if os.path.exists(box.path):
            raise UsageError(f"study {settings.name!r} exists already")
        for sub, mode in box.folders():
            _mkdir(sub, mode)
        doc = {"name": settings.name, "export": settings.export, "notify": list(settings.notify)}
        fsutil.write_new(self.settings_path(settings.name), json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
        fsutil.fsync_dir(self.dropbox_root)
        return box

    def mode_problems(self) -> list[str]:
        """What differs from the permission model (one line per folder)."""
        out = []
        wanted = self.folders()
        for s in self.studies():
            wanted += self.dropbox(s).folders()
        for path, mode in wanted:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                out.append(f"{path}: missing (want mode {mode:04o})")
                continue
            if not stat.S_ISDIR(st.st_mode):
                out.append(f"{path}: not a folder")
            elif stat.S_IMODE(st.st_mode) != mode:
                out.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, want {mode:04o}")
        return out


def _mkdir(path: str, mode: int) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)  # explicit: mkdir's mode is filtered by the umask, and drops setgid/sticky
