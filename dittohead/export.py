"""Export: the read-only view of one study, written into a destination folder, adding only.

``versions/`` holds the real bytes, each file written once (temporary name, fsync, link with no
overwrite) and made read-only. ``submissions/`` entries are hard links to those files.
``current/`` entries are hard links too, replaced atomically (rename) when a newer version
arrives: the one kind of change an export makes to what it wrote before. Nothing is deleted,
and a file in DEST that the export did not expect is left alone and reported: in ``current/``
too, an entry is replaced only if it is provably the export's own (see ``_owned``).
The layout is documented in docs/view.md.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Callable

from dittohead import fsutil
from dittohead.errors import IntegrityError
from dittohead.store.repo import Store
from dittohead.view import (
    CONFLICT_SUFFIX,
    Dir,
    File,
    StudyView,
    version_name,
    version_os_mtime,
    write_version,
)

FILE_MODE = 0o444


@dataclass
class ExportSummary:
    written: int = 0
    bytes: int = 0
    linked: int = 0
    current_updated: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # "PATH vN: why", versions not exported

    def line(self, dest: str) -> str:
        from dittohead.units import human_bytes

        s = (f"export: {self.written} version files written ({human_bytes(self.bytes)}), "
             f"{self.current_updated} current entries updated, {self.linked} links added, "
             f"{self.unchanged} already there; {dest}")
        if self.conflicts:
            s += f"; {len(self.conflicts)} files in the way left untouched"
        if self.damaged:
            s += (f"; {len(self.damaged)} versions not exported: damaged in the store "
                  "(run 'dittohead fsck --read-data')")
        return s


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _owned(entry: str, version_files: Collection[str]) -> bool:
    """Whether ``entry`` in current/ is the export's own earlier entry for a path whose version
    files (in DEST/versions/) are ``version_files``, and so may be swapped or moved.

    The export's entries are hard links to a version file of the same path: same inode. Where
    the filesystem has no hard links they are copies (``_link_or_copy``), so a regular file with
    the bytes of one of those versions counts as the export's too: replacing it loses nothing,
    as the same bytes stay in versions/. Anything else (the user's file, a symlink, a folder) is
    not the export's to replace.
    """
    try:
        st = os.lstat(entry)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    for vf in version_files:
        if _same_file(entry, vf):
            return True
    return any(os.path.getsize(vf) == st.st_size and filecmp.cmp(entry, vf, shallow=False)
               for vf in version_files)


def _move_aside(entry: str, aside: str) -> bool:
    """Move the export's own current/ entry ``entry`` to ``aside``, never overwriting.

    Used when a path that was a file becomes a folder: the view then shows the folder under the
    name and the file as ``NAME~file``, and moving the old entry there gives the layout a fresh
    export gives. Only the name moves: the file stays the same hard link to its version. An
    ``aside`` that is already the same file (a run that stopped half-way) is kept, and the
    extra link dropped; anything else at ``aside`` leaves ``entry`` where it is (False).
    """
    if os.path.lexists(aside) and not _same_file(entry, aside):
        return False
    fsutil.link_new(entry, aside)  # links (or renames), then drops the name ``entry``
    return True


def _parent_ready(target: str, summary: ExportSummary) -> bool:
    """Make ``target``'s folder; if a file stands where a folder must go, report that file once
    and return False, so that its would-be contents are skipped and the rest goes on."""
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        return True
    except (FileExistsError, NotADirectoryError):
        while not os.path.isdir(os.path.dirname(parent)):
            parent = os.path.dirname(parent)
        if parent not in summary.conflicts:
            summary.conflicts.append(parent)
        return False


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:
        with open(src, "rb") as fi, fsutil.new_file(dest, mode=FILE_MODE) as fo:
            while chunk := fi.read(1 << 20):
                fo.write(chunk)


def export_study(store: Store, study: str, dest: str,
                 progress: Callable[[int], None] | None = None) -> ExportSummary:
    """Write what is missing of the study's view into ``dest``; never fails because of what is
    already there.

    A path that was a file and is now also a folder (``data``, then ``data/f.txt``) is shown
    as the folder ``current/data/`` and the file ``current/data~file``. An earlier export left
    the file's entry at ``current/data``: if it is the export's own (``_owned``), it is moved to
    ``current/data~file`` (only its name changes; it is still a link to its version), so the
    destination ends as a fresh export would. If it is not (the user's file), it stays, is
    reported, and the folder's entries are left out of ``current/``; they are in versions/ and
    submissions/, and the next export adds them once the file is gone. The same holds for any
    file where a folder must go, in any of the three trees: reported once, the rest exported.
    The reverse (a folder that becomes a file) needs nothing special: the folder keeps its
    name and the file is added as ``data~file``.
    """
    view = StudyView(store, study)
    summary = ExportSummary()
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    vroot = os.path.join(dest, "versions")
    ours: dict[str, set[str]] = {}  # path -> its version files in DEST, the export's own

    def version_file(v) -> str:
        return os.path.join(vroot, *v.path.split("/"), version_name(v))

    # 1. every version's bytes, written once
    for _, node in view.walk(view.root.children["versions"]):
        if not isinstance(node, File):
            continue
        v = node.version
        target = version_file(v)
        if os.path.lexists(target):
            if os.path.getsize(target) != v.size:
                summary.conflicts.append(target)
            else:
                ours.setdefault(v.path, set()).add(target)
                summary.unchanged += 1
            continue
        if not _parent_ready(target, summary):
            continue
        try:
            with fsutil.new_file(target, mode=FILE_MODE) as f:
                write_version(store, v, f)
        except IntegrityError as e:  # no part of it stays (new_file); the rest goes on
            summary.damaged.append(f"{v.path} v{v.n}: {e}")
            continue
        t = version_os_mtime(v)
        os.utime(target, (t, t))
        ours.setdefault(v.path, set()).add(target)
        summary.written += 1
        summary.bytes += v.size
        if progress:
            progress(v.size)

    # 2. submissions/: links to the version files; 3. current/: links swapped atomically
    for top in ("submissions", "current"):
        for vpath, node in view.walk(view.root.children[top], top):
            target = os.path.join(dest, *vpath.split("/"))
            if isinstance(node, Dir):
                # current/PATH/ is a folder now; an old entry of ours for the file PATH moves
                # to PATH~file, where the view shows that file (see the docstring).
                path = vpath[len("current/"):]
                if (top == "current" and os.path.lexists(target) and not os.path.isdir(target)
                        and _owned(target, ours.get(path, set()))
                        and _move_aside(target, target + CONFLICT_SUFFIX)):
                    summary.current_updated += 1
                continue
            src = version_file(node.version)
            if src not in ours.get(node.version.path, ()):
                continue  # not written: what was in its way is reported already
            if _same_file(src, target):
                summary.unchanged += 1
                continue
            if not _parent_ready(target, summary):
                continue
            if not os.path.lexists(target):
                _link_or_copy(src, target)
                summary.linked += 1
            elif top == "current" and _owned(target, ours.get(node.version.path, set())):
                tmp = fsutil.tmp_name(os.path.dirname(target))
                _link_or_copy(src, tmp)
                os.replace(tmp, target)
                summary.current_updated += 1
            else:
                summary.conflicts.append(target)
    with contextlib.suppress(OSError):
        fsutil.fsync_dir(dest)
    return summary
