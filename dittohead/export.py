"""Export: the read-only view of one study, written into a destination folder, adding only.

``versions/`` holds the real bytes, each file written once (temporary name, fsync, link with no
overwrite) and made read-only. ``submissions/`` entries are hard links to those files.
``current/`` entries are hard links too, replaced atomically (rename) when a newer version
arrives: the one kind of change an export makes to what it wrote before. Nothing is deleted,
and a file in DEST that the export did not expect is left alone and reported.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

from dittohead import fsutil
from dittohead.store.repo import Store
from dittohead.view import File, StudyView, version_name, version_os_mtime, write_version

FILE_MODE = 0o444


@dataclass
class ExportSummary:
    written: int = 0
    bytes: int = 0
    linked: int = 0
    current_updated: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)

    def line(self, dest: str) -> str:
        from dittohead.units import human_bytes

        s = (f"export: {self.written} version files written ({human_bytes(self.bytes)}), "
             f"{self.current_updated} current entries updated, {self.linked} links added, "
             f"{self.unchanged} already there; {dest}")
        if self.conflicts:
            s += f"; {len(self.conflicts)} files in the way left untouched"
        return s


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:
        with open(src, "rb") as fi, fsutil.new_file(dest, mode=FILE_MODE) as fo:
            while chunk := fi.read(1 << 20):
                fo.write(chunk)


def export_study(store: Store, study: str, dest: str,
                 progress: Callable[[int], None] | None = None) -> ExportSummary:
    view = StudyView(store, study)
    summary = ExportSummary()
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    vroot = os.path.join(dest, "versions")

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
                summary.unchanged += 1
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fsutil.new_file(target, mode=FILE_MODE) as f:
            write_version(store, v, f)
        t = version_os_mtime(v)
        os.utime(target, (t, t))
        summary.written += 1
        summary.bytes += v.size
        if progress:
            progress(v.size)

    # 2. submissions/: links to the version files; 3. current/: links swapped atomically
    for top in ("submissions", "current"):
        for vpath, node in view.walk(view.root.children[top], top):
            if not isinstance(node, File):
                continue
            src = version_file(node.version)
            target = os.path.join(dest, *vpath.split("/"))
            if _same_file(src, target):
                summary.unchanged += 1
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                _link_or_copy(src, target)
                summary.linked += 1
            elif top == "current" and os.path.isfile(target) and not os.path.islink(target):
                tmp = fsutil.tmp_name(os.path.dirname(target))
                _link_or_copy(src, tmp)
                os.replace(tmp, target)
                summary.current_updated += 1
            else:
                summary.conflicts.append(target)
    with contextlib.suppress(OSError):
        fsutil.fsync_dir(dest)
    return summary
