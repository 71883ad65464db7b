"""The server root: where everything lives, with which owner, group and mode (docs/server-root.md).

Everything belongs to the daemon's account and its group (the owner and group of ``store/``),
except two things: a study added (or set) with ``--uploaders GROUP`` has its folder in GROUP, mode 0710,
so that only GROUP's members (and the daemon, its owner) can pass through it to the drop box;
and ROOT itself may be root's (root:root 0755), for uploaders that sshd chroots into it (sshd
takes a ChrootDirectory only if root owns it): the admin then makes ``store/`` and ``dropbox/``
in it for the daemon before ``init``.

    ROOT/                       0755
    ROOT/store/                 0700  config, packs/, manifests/, studies/, index.sqlite, quarantine/
    ROOT/dropbox/               0711  traverse only: an uploader cannot list the studies' names
    ROOT/dropbox/NAME/          0711, or 0710 in the uploaders' group
        inbox/                  3733  setgid + sticky: uploaders create, cannot list or touch others'
        have/                   0755  have-segments, read by clients
        receipts/               0711  one receipt per ingested submission, readable by name
        processing/ done/ failed/  0700
    ROOT/daemon/                0700  the watch daemon's own: its lock, watch.json, state.json, outbox/
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from dittohead import format as fmt
from dittohead import fsutil
from dittohead.daemon.config import DAEMON_DIR
from dittohead.errors import AlreadyExists, NoSuchStudy, StoreError, UsageError
from dittohead.store.config import StoreConfig

ROOT_MODE = 0o755
STORE_MODE = 0o700
# Traverse only: clients and sshd's internal-sftp -d /dropbox look studies up by name, and only
# the daemon (its owner) lists it. Earlier dittoheads made it 0755, which let every uploader
# list every study's name: fsck warns of that mode, and takes it for no damage.
DROPBOX_MODE = 0o711
OLD_DROPBOX_MODE = 0o755
STUDY_MODE = 0o711
STUDY_UPLOADERS_MODE = 0o710  # a study admitting one group of uploaders only
INBOX_MODE = 0o3733
HAVE_MODE = 0o755
RECEIPTS_MODE = 0o711
PRIVATE_MODE = 0o700
DAEMON_MODE = 0o700  # ROOT/daemon/: the watch daemon's lock, configuration, state and outbox
# Attempts the daemon may die in (killed, out of memory) before a submission in processing/ is
# set aside instead of being tried first at every start (``watch --max-attempts``).
MAX_ATTEMPTS = 3


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

    def folders(self, uploaders: bool = False) -> list[tuple[str, int]]:
        return [
            (self.path, STUDY_UPLOADERS_MODE if uploaders else STUDY_MODE),
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
    uploaders: str | None = None  # the one group whose members may submit, if set
    readers: str | None = None  # the one group whose members read the study's view (mount, export)
    notify_success: bool = False  # notify (``notify``) of each ingest too, not only of failures
    quota: int | None = None  # bytes the study may hold in the store before watch notifies
    hook: str | None = None  # a command watch runs after each ingest (docs/watch-housekeeping.md)

    def doc(self) -> dict:
        """The settings file's JSON document (store/studies/NAME.json)."""
        return {"name": self.name, "export": self.export, "notify": list(self.notify),
                "uploaders": self.uploaders, "readers": self.readers, "notify_success": self.notify_success,
                "quota": self.quota, "hook": self.hook}


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
    def daemon_dir(self) -> str:
        """ROOT/daemon/: what the watch daemon keeps between runs (dittohead/daemon/)."""
        return os.path.join(self.path, DAEMON_DIR)

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
            raise NoSuchStudy(f"no study {study!r} in {self.path} (add it with 'dittohead study add')")
        return box

    def study_settings(self, study: str) -> StudySettings:
        path = self.settings_path(study)
        try:
            doc = json.loads(fsutil.read_limited(path, fmt.CONFIG_MAX_SIZE))
            quota = doc.get("quota")
            if quota is not None and (not isinstance(quota, int) or quota < 0):
                raise ValueError(f"quota {quota!r} is not a number of bytes")
            return StudySettings(study, doc.get("export"), tuple(doc.get("notify", ())), doc.get("uploaders"),
                                 doc.get("readers"), bool(doc.get("notify_success", False)), quota,
                                 doc.get("hook"))
        except FileNotFoundError:
            return StudySettings(study)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: bad study settings ({e})") from None

    # -- creating
    def init(self) -> StoreConfig:
        if self.is_initialised():
            raise AlreadyExists(f"{self.path}: already a dittohead server root")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"{self.path}: exists and is not a folder")
        if os.path.isdir(self.path) and not self._prepared():
            raise UsageError(f"{self.path}: folder is not empty")
        os.makedirs(self.path, exist_ok=True)
        if not self._root_is_roots():
            _mkdir(self.path, ROOT_MODE)
        elif stat.S_IMODE(os.stat(self.path).st_mode) != ROOT_MODE:
            raise UsageError(f"{self.path}: root's folder with mode {stat.S_IMODE(os.stat(self.path).st_mode):04o}: "
                             f"make it {ROOT_MODE:04o} (chmod {ROOT_MODE:o} as root), as sshd wants a ChrootDirectory")
        elif not (os.path.isdir(self.store) and os.path.isdir(self.dropbox_root)):
            raise UsageError(f"{self.path} is root's: first make store/ and dropbox/ in it, owned by this "
                             "account (docs/server-root.md, \"Uploaders chrooted by sshd\")")
        for sub, mode in self.folders():
            _mkdir(sub, mode)
        if not self._root_is_roots() or os.path.isdir(self.daemon_dir):
            _mkdir(self.daemon_dir, DAEMON_MODE)  # under root's ROOT, only if the admin made it
        cfg = StoreConfig.new()
        fsutil.write_new(self.config_path, cfg.encode(), mode=0o600)
        fsutil.fsync_dir(self.path)
        return cfg

    def _root_is_roots(self) -> bool:
        """ROOT belongs to root and this account is not root: the chroot arrangement."""
        return os.stat(self.path).st_uid == 0 and os.geteuid() != 0

    def _prepared(self) -> bool:
        """ROOT is empty, or holds only the empty ``store/`` and ``dropbox/`` an admin made for
        this account (the chroot arrangement)."""
        names = os.listdir(self.path)
        if not set(names) <= {"store", "dropbox", DAEMON_DIR}:
            return False
        for name in names:
            path = os.path.join(self.path, name)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or os.listdir(path):
                return False
        return True

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

    def make_daemon_dir(self) -> str:
        """ROOT/daemon/ for the watch daemon, where a server root made by an earlier dittohead has
        none (``init`` makes it); PermissionError where ROOT is not this account's."""
        _mkdir(self.daemon_dir, DAEMON_MODE)
        fsutil.fsync_dir(self.path)
        return self.daemon_dir

    def add_study(self, settings: StudySettings) -> StudyDropbox:
        self.config()
        box = self.dropbox(settings.name)
        if os.path.exists(box.path):
            raise AlreadyExists(f"study {settings.name!r} exists already")
        gid = group_id(settings.uploaders) if settings.uploaders else None
        if settings.readers:
            group_id(settings.readers)  # a group that exists, or a usage error
        folders = box.folders(uploaders=gid is not None)
        _mkdir(box.path, 0o700)  # closed until it has its group
        if gid is not None:
            try:
                os.chown(box.path, -1, gid)
            except PermissionError:
                os.rmdir(box.path)
                raise _not_member(settings.name, settings.uploaders) from None
        for sub, mode in folders[1:]:
            _mkdir(sub, mode)
        os.chmod(box.path, folders[0][1])
        fsutil.write_new(self.settings_path(settings.name), _settings_bytes(settings), mode=0o600)
        fsutil.fsync_dir(self.dropbox_root)
        return box

    def change_study(self, study: str, **changes: Any) -> StudySettings:
        """Change settings of the existing study ``study`` (``readers``, ``uploaders``,
        ``export``...: the fields of StudySettings), and return them as they are now. The
        settings file is replaced at once (written, fsynced, renamed over the old one): a reader
        sees the old settings or the new ones. It is the admin's configuration, not the study's
        history: the one file under store/ that is ever replaced.

        ``uploaders`` (a group, or None for any account) is also the drop box folder's group:
        the folder gets the group and mode ``add_study`` gives a study with those uploaders
        (``_give_uploaders``), before the settings file says so.

        NoSuchStudy if there is no such study; a UsageError, before anything is changed, for a
        readers or uploaders group that does not exist, or an uploaders group this account may
        not give the folder (not a member of it)."""
        self.config()
        box = self.require_study(study)
        unknown = set(changes) - {"readers", "uploaders", "export", "notify", "notify_success", "quota", "hook"}
        if unknown:
            raise UsageError(f"cannot change {', '.join(sorted(unknown))} of a study here")
        if changes.get("readers"):
            group_id(changes["readers"])
        gid = None
        if "uploaders" in changes:
            changes["uploaders"] = changes["uploaders"] or None
            gid = group_id(changes["uploaders"]) if changes["uploaders"] else os.stat(self.store).st_gid
            if not is_member(gid):
                raise _not_member(study, changes["uploaders"] or _group_name(gid))
        settings = dataclasses.replace(self.study_settings(study), **changes)
        if gid is not None:
            self._give_uploaders(box, gid, settings.uploaders)
        fsutil.replace_file(self.settings_path(study), _settings_bytes(settings), mode=0o600)
        return settings

    def _give_uploaders(self, box: StudyDropbox, gid: int, uploaders: str | None) -> None:
        """The study's folder in group ``gid`` with the mode ``add_study`` gives it (0710 for a
        group of uploaders, 0711 for any account), closed (0700) while its group changes, as
        ``add_study`` makes it: at no moment does anyone pass who is in neither the old set of
        uploaders nor the new. What is below it keeps its group and modes."""
        mode = box.folders(uploaders=bool(uploaders))[0][1]
        was = stat.S_IMODE(os.lstat(box.path).st_mode)
        os.chmod(box.path, 0o700)
        try:
            os.chown(box.path, -1, gid)
        except PermissionError:
            os.chmod(box.path, was)
            raise _not_member(box.name, uploaders or _group_name(gid)) from None
        os.chmod(box.path, mode)
        fsutil.fsync_dir(self.dropbox_root)

    def permission_problems(self) -> list[str]:
        """What differs from the permission model: one line per folder whose mode, owner or
        group is not what ``init`` and ``study add`` set (the owner and group of ``store/`` are
        the daemon's)."""
        try:
            st = os.lstat(self.store)
        except OSError as e:
            return [f"{self.store}: {e.strerror}"]
        uid, gid = st.st_uid, st.st_gid
        out = []
        wanted = [(p, m, gid) for p, m in self.folders()]
        try:
            root = os.lstat(self.path)
        except OSError as e:
            return [f"{self.path}: {e.strerror}"]
        if root.st_uid == 0 and uid != 0:  # the chroot arrangement: root's, 0755
            if stat.S_IMODE(root.st_mode) != ROOT_MODE:
                out.append(f"{self.path}: mode {stat.S_IMODE(root.st_mode):04o}, want {ROOT_MODE:04o}")
        else:
            wanted.insert(0, (self.path, ROOT_MODE, gid))
        if os.path.lexists(self.daemon_dir):  # made by init, or by watch for an older root
            wanted.append((self.daemon_dir, DAEMON_MODE, gid))
        for s in self.studies():
            box = self.dropbox(s)
            try:
                uploaders = self.study_settings(s).uploaders
                study_gid = group_id(uploaders) if uploaders else gid
            except (StoreError, UsageError) as e:
                out.append(f"{box.path}: {e}")
                continue
            folders = box.folders(uploaders=bool(uploaders))
            wanted.append((folders[0][0], folders[0][1], study_gid))
            wanted += [(p, m, gid) for p, m in folders[1:]]
        for path, mode, want_gid in wanted:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                out.append(f"{path}: missing (want mode {mode:04o})")
                continue
            if not stat.S_ISDIR(st.st_mode):
                out.append(f"{path}: not a folder")
                continue
            if stat.S_IMODE(st.st_mode) != mode and not (path == self.dropbox_root
                                                         and stat.S_IMODE(st.st_mode) == OLD_DROPBOX_MODE):
                out.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, want {mode:04o}")
            if st.st_uid != uid:
                out.append(f"{path}: owner {_user_name(st.st_uid)}, want {_user_name(uid)} (the owner of store/)")
            if st.st_gid != want_gid:
                out.append(f"{path}: group {_group_name(st.st_gid)}, want {_group_name(want_gid)}")
        return out


    def permission_notes(self) -> list[str]:
        """What is as an earlier dittohead made it, and no damage, but tighter now: one line
        each, saying what it costs and the command that sets it right (fsck's warnings)."""
        try:
            st = os.lstat(self.dropbox_root)
        except OSError:
            return []
        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == OLD_DROPBOX_MODE:
            why = (f"mode {OLD_DROPBOX_MODE:04o}, as earlier dittoheads made it: every uploader can list the "
                   f"studies' names; want {DROPBOX_MODE:04o} (chmod {DROPBOX_MODE:o} {self.dropbox_root})")
            return [f"{self.dropbox_root}: {why}"]
        return []


def _not_member(study: str, group: str | None) -> UsageError:
    return UsageError(f"cannot give study {study!r} to group {group!r}: the daemon's account must be a member "
                      "of it (usermod -aG GROUP ACCOUNT, then sign in again)")


def _settings_bytes(settings: StudySettings) -> bytes:
    return json.dumps(settings.doc(), indent=2).encode() + b"\n"


def is_member(gid: int) -> bool:
    """Whether this process may give a file it owns the group ``gid`` (a member of it, or root)."""
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def group_id(name: str) -> int:
    """The id of the group ``name`` (a name, or a number)."""
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise UsageError(f"no group named {name!r} on this system") from None


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _mkdir(path: str, mode: int) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)  # explicit: mkdir's mode is filtered by the umask, and drops setgid/sticky
