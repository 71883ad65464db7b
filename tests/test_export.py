"""The export: the read-only view written to a folder, adding only.

Layout (the same as the mount's):
    DEST/current/PATH                              latest version of every path ever received
    DEST/versions/PATH/NNNN_STAMP_SITE.EXT         every version, numbered from 0001
    DEST/submissions/STAMP_SITE_SEQ/PATH           each submission as received (SEQ: 6 digits)
STAMP is the UTC ingest time (20261121T101502Z), SITE the sanitised site name, EXT the path's
extension with its dot (or nothing). A path that was a file and is also a folder shows its file
as current/PATH~file. A second export touches no existing file except current/ entries it wrote
itself, which may be swapped atomically for hard links to the new versions (or moved to PATH~file);
nothing is ever deleted, not even a path deleted at the source, and a file of the user's in the
way is left as it is.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from click.testing import Result
from conftest import Server, write_file

SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._-]+$")


def stamp(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


def ext(path: str) -> str:
    return os.path.splitext(path)[1]


def export(server: Server, dest: Path) -> Result:
    return server.ok("export", "--store", server.root, "--study", server.study, dest)


def files_under(top: Path) -> dict[str, os.stat_result]:
    """Every non-directory entry under top (relative POSIX path -> lstat)."""
    found = {}
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            p = os.path.join(dirpath, name)
            found[Path(os.path.relpath(p, top)).as_posix()] = os.lstat(p)
    return found


def snapshot(top: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file but log.jsonl, which an export appends to (tests/test_view_access_log.py)."""
    return {
        rel: (st.st_ino, st.st_mtime_ns, (top / rel).read_bytes())
        for rel, st in files_under(top).items()
        if rel != "log.jsonl"
    }


class Model:
    """What the export must contain, kept from what was synced and what the log says."""

    def __init__(self) -> None:
        self.versions: dict[str, list[tuple[bytes, int]]] = {}  # path -> [(bytes, seq)]
        self.submissions: dict[int, dict[str, bytes]] = {}  # seq -> the files it carried

    def submitted(self, seq: int, files: dict[str, bytes]) -> None:
        self.submissions[seq] = dict(files)
        for path, data in files.items():
            history = self.versions.setdefault(path, [])
            if not history or history[-1][0] != data:
                history.append((data, seq))


def check_layout(
    server: Server, dest: Path, model: Model, extra: frozenset[str] = frozenset()
) -> None:
    log = {s["seq"]: s for s in server.log()}
    present = files_under(dest)
    expected: set[str] = set(extra)

    for path, history in model.versions.items():
        # current/: the latest version's bytes, a hard link to its file in versions/. A path
        # that is also a folder (``a`` and ``a/b``) is shown as ``a~file``.
        shown = path + "~file" if any(p.startswith(path + "/") for p in model.versions) else path
        current = dest / "current" / shown
        assert current.read_bytes() == history[-1][0], f"current/{shown}"
        expected.add(f"current/{shown}")

        listed = server.versions(path)
        assert len(listed) == len(history), (path, listed)
        folder = dest / "versions" / path
        names = sorted(n for n in os.listdir(folder) if (folder / n).is_file())
        assert len(names) == len(history), (path, names)
        for number, ((data, seq), info, name) in enumerate(zip(history, listed, names), start=1):
            sub = log[seq]
            assert info["seq"] == seq, (path, info)
            site = name.split("_", 2)[2][: len(name.split("_", 2)[2]) - len(ext(path))]
            assert name == f"{number:04d}_{stamp(info['ingested_ns'])}_{site}{ext(path)}", name
            assert SAFE_COMPONENT.match(site), f"site part {site!r} of {name!r} is not sanitised"
            assert (folder / name).read_bytes() == data, f"versions/{path}/{name}"
            assert (folder / name).read_bytes() == server.cat(path, version=number)
            assert stamp(sub["ingested_ns"]) == stamp(info["ingested_ns"])
            expected.add(f"versions/{path}/{name}")
        assert os.path.samefile(current, folder / names[-1]), (
            f"current/{path} is not a link to its latest version"
        )

    # submissions/: each submission's files as received.
    subdirs = sorted(os.listdir(dest / "submissions"))
    assert len(subdirs) == len(model.submissions), subdirs
    for seq, files in model.submissions.items():
        sub = log[seq]
        prefix = f"{stamp(sub['ingested_ns'])}_"
        suffix = f"_{seq:06d}"
        matching = [d for d in subdirs if d.startswith(prefix) and d.endswith(suffix)]
        assert len(matching) == 1, (seq, subdirs)
        site = matching[0][len(prefix) : -len(suffix)]
        assert SAFE_COMPONENT.match(site), site
        top = dest / "submissions" / matching[0]
        carried = {rel for rel in files_under(top)}
        # A submission carries at least what it changed; whatever it carries is as sent.
        changed = {p for p, h in model.versions.items() if any(s == seq for _d, s in h)}
        assert changed <= carried, (seq, changed - carried)
        for rel in carried:
            assert rel in files, f"submission {seq} holds {rel!r}, which was not sent in it"
            assert (top / rel).read_bytes() == files[rel], f"submissions/{matching[0]}/{rel}"
            expected.add(f"submissions/{matching[0]}/{rel}")

    # log.jsonl: one line per submission, what `log --json` lists (tests/test_view_access_log.py)
    assert [json.loads(line) for line in (dest / "log.jsonl").read_bytes().splitlines()] == server.log()
    expected.add("log.jsonl")

    assert set(present) == expected, (
        f"unexpected: {sorted(set(present) - expected)}; missing: {sorted(expected - set(present))}"
    )


def sync_round(server: Server, src: Path, model: Model, site: str) -> dict[str, bytes]:
    sent = server.sync(src, site=site)
    assert sent.submission is not None, sent.output
    server.ingest()
    seq = max(s["seq"] for s in server.log())
    files = {
        Path(os.path.relpath(os.path.join(d, f), src)).as_posix(): Path(d, f).read_bytes()
        for d, _dirs, names in os.walk(src)
        for f in names
    }
    model.submitted(seq, files)
    return files


def test_export_layout_and_adding_only(server: Server, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    rng = random.Random(7)
    write_file(src / "data/run1.csv", b"t,x\n0,1\n")
    write_file(src / "README", b"no extension\n")
    write_file(src / "sub dir/r\u00e9sum\u00e9.txt", b"non-ASCII name\n")
    write_file(src / "deleteme.txt", b"gone at the source after round 1\n")
    write_file(src / "big.bin", rng.randbytes(600 * 1024))
    write_file(src / "empty.dat", b"")
    model = Model()
    sync_round(server, src, model, site="labA")

    export(server, dest)
    check_layout(server, dest, model)
    sub = server.log()[0]
    assert (
        dest / "versions/data/run1.csv" / f"0001_{stamp(sub['ingested_ns'])}_labA.csv"
    ).is_file()
    assert (dest / "versions/README" / f"0001_{stamp(sub['ingested_ns'])}_labA").is_file()
    assert (dest / "submissions" / f"{stamp(sub['ingested_ns'])}_labA_000001" / "big.bin").is_file()

    # Exporting again with nothing new touches nothing at all.
    before = snapshot(dest)
    export(server, dest)
    assert snapshot(dest) == before

    # Round 2: an edit, a deletion, an addition, from a site whose name needs sanitising.
    write_file(src / "data/run1.csv", b"t,x\n0,1\n1,2\n")
    (src / "deleteme.txt").unlink()
    write_file(src / "new.txt", b"added in round 2\n")
    sync_round(server, src, model, site="lab B/2")
    # Round 3: back to the first content is a new version too; big.bin edited in place.
    write_file(src / "data/run1.csv", b"t,x\n0,1\n")
    big = bytearray((src / "big.bin").read_bytes())
    big[300_000:300_010] = b"0123456789"
    write_file(src / "big.bin", bytes(big))
    sync_round(server, src, model, site="labA")

    (dest / "mine.txt").write_bytes(b"the user's own file\n")
    before = snapshot(dest)
    export(server, dest)
    after = snapshot(dest)
    check_layout(server, dest, model, extra=frozenset({"mine.txt"}))

    for rel, (ino, mtime, data) in before.items():
        assert rel in after, f"{rel} was deleted by the export"
        if rel.startswith("current/"):
            path = rel[len("current/") :]
            assert after[rel][2] == model.versions[path][-1][0], rel
        else:
            assert after[rel] == (ino, mtime, data), f"{rel} was touched by the export"
    assert (dest / "current/deleteme.txt").read_bytes() == b"gone at the source after round 1\n"
    assert len(os.listdir(dest / "versions/data/run1.csv")) == 3
    assert (dest / "current/data/run1.csv").read_bytes() == b"t,x\n0,1\n"
    assert (dest / "mine.txt").read_bytes() == b"the user's own file\n"


def test_export_to_a_fresh_destination_matches_an_incremental_one(
    server: Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    model = Model()
    write_file(src / "a.txt", b"1")
    sync_round(server, src, model, site="x")
    export(server, tmp_path / "incremental")
    write_file(src / "a.txt", b"2")
    write_file(src / "b/c.txt", b"3")
    sync_round(server, src, model, site="y")
    export(server, tmp_path / "incremental")
    export(server, tmp_path / "fresh")

    def content(top: Path) -> dict[str, bytes]:
        return {rel: data for rel, (_i, _m, data) in snapshot(top).items()}

    assert content(tmp_path / "incremental") == content(tmp_path / "fresh")
    check_layout(server, tmp_path / "fresh", model)


def content(top: Path) -> dict[str, bytes]:
    return {rel: data for rel, (_i, _m, data) in snapshot(top).items()}


def untouched(path: Path) -> tuple[int, ...]:
    """What a file the export leaves alone keeps: the same file (device, inode), no link added or
    removed, the same owner, mode and size, and no write or change of its metadata (mtime and
    ctime, in ns). Not its access time: whether a read updates that depends on the mount
    (relatime, noatime, strictatime, a FUSE or network filesystem), and any process may read it."""
    st = os.lstat(path)
    return (st.st_dev, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_mode, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


def warned(result: Result) -> str:
    return "".join(
        line for line in result.stderr.splitlines(keepends=True) if "left untouched" in line
    )


def test_a_file_in_current_that_the_export_did_not_write_is_left_alone(
    server: Server, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    model = Model()
    write_file(src / "a.txt", b"a1\n")
    write_file(src / "b.txt", b"b1\n")
    write_file(src / "empty.dat", b"")
    sync_round(server, src, model, site="labA")

    # A file of the user's where the export would put a current/ entry, before the first export.
    write_file(dest / "current/empty.dat", b"junk\n")
    junk = os.stat(dest / "current/empty.dat")
    result = export(server, dest)
    assert (dest / "current/empty.dat").read_bytes() == b"junk\n"
    assert os.stat(dest / "current/empty.dat").st_ino == junk.st_ino
    assert str(dest / "current/empty.dat") in warned(result), result.stderr
    assert "1 files in the way left untouched" in result.stdout

    # The user replaces an entry the export wrote by a file of their own; then a new version.
    (dest / "current/a.txt").unlink()
    (dest / "current/a.txt").write_bytes(b"my own a\n")
    mine = untouched(dest / "current/a.txt")
    write_file(src / "a.txt", b"a2\n")
    write_file(src / "b.txt", b"b2\n")
    sync_round(server, src, model, site="labA")
    result = export(server, dest)
    assert untouched(dest / "current/a.txt") == mine
    assert (dest / "current/a.txt").read_bytes() == b"my own a\n"
    assert (dest / "current/empty.dat").read_bytes() == b"junk\n"
    assert str(dest / "current/a.txt") in warned(result), result.stderr
    # The export's own entry is still swapped to the new version, a link to it.
    assert (dest / "current/b.txt").read_bytes() == b"b2\n"
    latest = max(os.listdir(dest / "versions/b.txt"))
    assert os.path.samefile(dest / "current/b.txt", dest / "versions/b.txt" / latest)
    for rel in ("a.txt", "empty.dat"):
        (dest / "current" / rel).unlink()
    export(server, dest)
    check_layout(server, dest, model)


def test_without_hard_links_copies_in_current_are_left_at_their_version(
    server: Server, tmp_path: Path, monkeypatch
) -> None:
    """Where the destination has no hard links the entries are copies. A copy is not provably
    the export's own (only the same inode as a version file is: anyone who can write in DEST
    can write a file with a version's bytes), so a newer version does not replace it: it stays,
    is reported, and the next export after it is removed adds the newer one."""

    def no_links(_src: object, _dst: object, **_kw: object) -> None:
        raise PermissionError(errno.EPERM, "hard links not supported")

    src, dest = tmp_path / "src", tmp_path / "export"
    model = Model()
    write_file(src / "a.txt", b"a1\n")
    write_file(src / "b.txt", b"b1\n")
    sync_round(server, src, model, site="labA")
    with monkeypatch.context() as m:
        m.setattr(os, "link", no_links)
        export(server, dest)
    assert os.stat(dest / "current/a.txt").st_nlink == 1  # a copy
    copy = untouched(dest / "current/a.txt")
    (dest / "current/b.txt").unlink()
    (dest / "current/b.txt").write_bytes(b"my own b\n")
    write_file(src / "a.txt", b"a2\n")
    write_file(src / "b.txt", b"b2\n")
    sync_round(server, src, model, site="labA")
    with monkeypatch.context() as m:
        m.setattr(os, "link", no_links)
        result = export(server, dest)
    assert untouched(dest / "current/a.txt") == copy
    assert (dest / "current/a.txt").read_bytes() == b"a1\n"
    assert str(dest / "current/a.txt") in warned(result), result.stderr
    assert (dest / "current/b.txt").read_bytes() == b"my own b\n"
    assert str(dest / "current/b.txt") in warned(result), result.stderr
    assert sorted(p.read_bytes() for p in (dest / "versions/a.txt").iterdir()) == [b"a1\n", b"a2\n"]
    (dest / "current/a.txt").unlink()
    with monkeypatch.context() as m:
        m.setattr(os, "link", no_links)
        export(server, dest)
    assert (dest / "current/a.txt").read_bytes() == b"a2\n"


def test_a_second_export_after_a_file_becomes_a_folder(server: Server, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    model = Model()
    write_file(src / "data", b"data as a file\n")
    write_file(src / "keep.txt", b"keep\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)
    before = snapshot(dest)

    (src / "data").unlink()
    write_file(src / "data/f.txt", b"now a folder\n")
    sync_round(server, src, model, site="labA")
    result = export(server, dest)
    assert warned(result) == "", result.stderr
    check_layout(server, dest, model)
    after = snapshot(dest)
    # Nothing the first export wrote changed; its current/data entry (a link to version 1 of
    # data) only moved to current/data~file, where a fresh export puts it.
    for rel, was in before.items():
        assert after[rel if rel != "current/data" else "current/data~file"] == was, rel
    export(server, tmp_path / "fresh")
    assert content(dest) == content(tmp_path / "fresh")
    export(server, dest)
    assert snapshot(dest) == after

    # And back to a file with new bytes: current/data~file is swapped, versions/ only grows.
    shutil.rmtree(src / "data")
    write_file(src / "data", b"a file again\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)
    check_layout(server, dest, model)
    final = snapshot(dest)
    assert all(final[rel] == was for rel, was in after.items() if rel != "current/data~file")
    assert (dest / "current/data~file").read_bytes() == b"a file again\n"


def test_a_second_export_after_a_folder_becomes_a_file(server: Server, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    model = Model()
    write_file(src / "data/f.txt", b"in a folder\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)
    before = snapshot(dest)

    shutil.rmtree(src / "data")
    write_file(src / "data", b"now a file\n")
    sync_round(server, src, model, site="labA")
    result = export(server, dest)
    assert warned(result) == "", result.stderr
    check_layout(server, dest, model)
    after = snapshot(dest)
    assert all(after[rel] == was for rel, was in before.items())
    export(server, tmp_path / "fresh")
    assert content(dest) == content(tmp_path / "fresh")


def test_a_users_file_where_a_folder_must_go_is_left_and_the_rest_exported(
    server: Server, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    model = Model()
    write_file(src / "data", b"data as a file\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)
    (dest / "current/data").unlink()
    (dest / "current/data").write_bytes(b"my notes\n")

    (src / "data").unlink()
    write_file(src / "data/f.txt", b"now a folder\n")
    write_file(src / "other.txt", b"other\n")
    sync_round(server, src, model, site="labA")
    result = export(server, dest)
    assert (dest / "current/data").read_bytes() == b"my notes\n"
    assert warned(result).strip().endswith(str(dest / "current/data")), result.stderr
    # Everything else is there: the file as data~file, every version, every submission.
    assert (dest / "current/data~file").read_bytes() == b"data as a file\n"
    assert (dest / "current/other.txt").read_bytes() == b"other\n"
    (f_txt,) = os.listdir(dest / "versions/data/f.txt")
    assert (dest / "versions/data/f.txt" / f_txt).read_bytes() == b"now a folder\n"
    export(server, dest)  # and again: never fails for good

    (dest / "current/data").unlink()
    result = export(server, dest)
    assert warned(result) == "", result.stderr
    check_layout(server, dest, model)


def test_a_damaged_chunk_costs_its_versions_only(server: Server, tmp_path: Path) -> None:
    """A chunk damaged in the store: export writes every other version, writes nothing of the
    damaged ones (no partial file), names each one, and exits 1; cat names the study, path and
    version. After the damage is repaired, the next export adds what was left out."""
    src = tmp_path / "src"
    big = random.Random(5).randbytes(300_000)
    write_file(src / "big.bin", big)
    write_file(src / "small.txt", b"fine\n")
    server.sync(src)
    server.ingest()
    packs = sorted((server.root / "store" / "packs").rglob("*.pack"))
    original = {p: p.read_bytes() for p in packs}
    hit = next(p for p, data in original.items() if big[1000:1064] in data)
    damaged = bytearray(original[hit])
    damaged[damaged.index(big[1000:1064]) + 10] ^= 0x04
    os.chmod(hit, 0o600)
    hit.write_bytes(bytes(damaged))

    dest = tmp_path / "dest"
    res = server.run("export", "--store", server.root, "--study", server.study, dest)
    assert res.exit_code == 1, res.output
    assert "s:big.bin v1: chunk" in res.stderr and "fsck --read-data" in res.stdout, res.output
    assert (dest / "current" / "small.txt").read_bytes() == b"fine\n"
    assert not (dest / "current" / "big.bin").exists()
    assert not any((dest / "versions" / "big.bin").iterdir())  # no partial file
    cat = server.run("cat", "--store", server.root, "--study", "s", "big.bin")
    assert cat.exit_code == 1 and "s:big.bin v1: chunk" in cat.stderr, cat.output
    assert big.startswith(cat.stdout_bytes)  # a verified prefix at most, never wrong bytes

    hit.write_bytes(original[hit])
    again = export(server, dest)
    assert again.exit_code == 0, again.output
    assert (dest / "current" / "big.bin").read_bytes() == big


# An export destination may be writable by others (a shared study folder): what they put there
# never leads the export outside DEST, and never passes for the export's own.


def tree(top: Path) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    """Every entry under top, folders and symlinks too, without following a symlink:
    relative path -> (mode, inode, mtime, bytes of a file | a symlink's target | None)."""
    found: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for dirpath, dirs, names in os.walk(top):
        for name in dirs + names:
            p = Path(dirpath, name)
            st = os.lstat(p)
            what: bytes | str | None = None
            if p.is_symlink():
                what = os.readlink(p)
            elif p.is_file():
                what = p.read_bytes()
            found[p.relative_to(top).as_posix()] = (st.st_mode, st.st_ino, st.st_mtime_ns, what)
    return found


def symlink_in_place_of(entry: Path, target: Path) -> None:
    """Replace whatever is at ``entry`` (a folder or a file) by a symlink to ``target``."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.symlink_to(target)


def without(files: dict[str, bytes], *prefixes: str) -> dict[str, bytes]:
    return {rel: data for rel, data in files.items()
            if not any(rel == p or rel.startswith(p + "/") for p in prefixes)}


def test_folders_replaced_by_symlinks_lead_nowhere_outside_dest(
    server: Server, tmp_path: Path
) -> None:
    """A folder in current/, one in versions/ and one in submissions/ replaced by symlinks to a
    folder outside DEST (the daemon's home, say): nothing is written outside, the symlinks stay
    and are reported, what would have gone beneath them is left out, and the rest is exported."""
    src, dest, home = tmp_path / "src", tmp_path / "export", tmp_path / "home"
    write_file(home / "notes.txt", b"the daemon's own\n")
    (home / ".ssh").mkdir()
    model = Model()
    write_file(src / "x/a.txt", b"x a1\n")
    write_file(src / "keep.txt", b"keep 1\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)

    write_file(src / "x/.ssh/authorized_keys", b"ssh-ed25519 AAAA... an uploader\n")
    write_file(src / "x/a.txt", b"x a2\n")
    write_file(src / "keep.txt", b"keep 2\n")
    write_file(src / "y/b.txt", b"y b\n")
    sync_round(server, src, model, site="labA")
    seq = max(s["seq"] for s in server.log())
    sub = next(s for s in server.log() if s["seq"] == seq)
    sub2 = f"submissions/{stamp(sub['ingested_ns'])}_labA_{seq:06d}"
    links = {
        "current/x": home,
        "versions/x": home / ".ssh",
        f"{sub2}/x": home,
    }
    (dest / sub2).mkdir(parents=True)
    aside = tmp_path / "aside"
    aside.mkdir()
    for rel, target in links.items():
        if (dest / rel).exists():  # kept, to be put back at the end
            (dest / rel).rename(aside / rel.replace("/", "_"))
        symlink_in_place_of(dest / rel, target)
    outside = tree(home)

    result = export(server, dest)
    assert tree(home) == outside, "the export wrote outside its destination"
    for rel, target in links.items():
        assert (dest / rel).is_symlink() and os.readlink(dest / rel) == str(target), rel
        assert str(dest / rel) in warned(result), (rel, result.stderr)
    assert f"{len(links)} files in the way left untouched" in result.stdout, result.stdout
    export(server, tmp_path / "fresh")
    assert content(dest) == without(content(tmp_path / "fresh"), *links), (
        sorted(set(content(dest)) ^ set(without(content(tmp_path / "fresh"), *links))))
    assert (dest / "current/keep.txt").read_bytes() == b"keep 2\n"
    assert (dest / "current/y/b.txt").read_bytes() == b"y b\n"

    # Once the symlinks are gone (the folders they replaced put back), the next export adds
    # what was left out.
    for rel in links:
        (dest / rel).unlink()
        if (aside / rel.replace("/", "_")).exists():
            (aside / rel.replace("/", "_")).rename(dest / rel)
    result = export(server, dest)
    assert warned(result) == "", result.stderr
    check_layout(server, dest, model)
    assert tree(home) == outside


def test_file_entries_replaced_by_symlinks_are_left_and_reported(
    server: Server, tmp_path: Path
) -> None:
    """A current/ entry replaced by a symlink to a file outside DEST, and a symlink to a file
    outside (of the right size) planted where a new version's file will go: the outside files
    are not changed, linked or copied in, and the symlinks stay and are reported."""
    src, dest, outside = tmp_path / "src", tmp_path / "export", tmp_path / "outside"
    model = Model()
    write_file(src / "a.txt", b"a1\n")
    write_file(src / "b.txt", b"b1\n")
    write_file(src / "c.txt", b"c1\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)

    write_file(outside / "secret", b"the daemon's secret\n")
    write_file(outside / "key", b"k" * len(b"b2 longer\n"))
    symlink_in_place_of(dest / "current/a.txt", outside / "secret")
    write_file(src / "a.txt", b"a2\n")
    write_file(src / "b.txt", b"b2 longer\n")
    write_file(src / "c.txt", b"c2\n")
    sync_round(server, src, model, site="labA")
    b2 = server.versions("b.txt")[-1]
    planted = dest / "versions/b.txt" / f"0002_{stamp(b2['ingested_ns'])}_labA.txt"
    symlink_in_place_of(planted, outside / "key")
    before = tree(outside)

    result = export(server, dest)
    assert tree(outside) == before
    assert all(os.lstat(outside / f).st_nlink == 1 for f in ("secret", "key"))
    for entry, target in ((dest / "current/a.txt", outside / "secret"), (planted, outside / "key")):
        assert entry.is_symlink() and os.readlink(entry) == str(target), entry
        assert str(entry) in warned(result), (entry, result.stderr)
    assert not any(data == b"k" * 10 for rel, (_m, _i, _t, data) in tree(dest).items()
                   if (dest / rel) != planted), "an outside file was linked or copied in"
    # b.txt's new version was not written, so nothing links to it; the rest is exported.
    assert (dest / "current/b.txt").read_bytes() == b"b1\n"
    assert (dest / "current/c.txt").read_bytes() == b"c2\n"
    assert len(os.listdir(dest / "versions/a.txt")) == 2


def test_a_file_with_an_older_versions_bytes_is_not_the_exports_own(
    server: Server, tmp_path: Path
) -> None:
    """A file in current/ with exactly the bytes of an older version of its path, but not the
    same inode as that version's file, is somebody's file: a newer version leaves it alone."""
    src, dest = tmp_path / "src", tmp_path / "export"
    model = Model()
    write_file(src / "a.txt", b"a1\n")
    sync_round(server, src, model, site="labA")
    export(server, dest)
    (dest / "current/a.txt").unlink()
    (dest / "current/a.txt").write_bytes(b"a1\n")
    mine = untouched(dest / "current/a.txt")

    write_file(src / "a.txt", b"a2\n")
    sync_round(server, src, model, site="labA")
    result = export(server, dest)
    assert untouched(dest / "current/a.txt") == mine
    assert (dest / "current/a.txt").read_bytes() == b"a1\n"
    assert str(dest / "current/a.txt") in warned(result), result.stderr
    assert "1 files in the way left untouched" in result.stdout
    assert sorted(p.read_bytes() for p in (dest / "versions/a.txt").iterdir()) == [b"a1\n", b"a2\n"]


def test_a_path_deeper_than_the_descriptors_a_process_may_hold(server: Server, tmp_path: Path) -> None:
    """A valid path of 1,500 folders (more than Python's recursion limit, and than the 256
    descriptors the export here may hold): exported, byte for byte, and a second export finds
    it there."""
    import resource
    import subprocess
    import sys

    from test_view_lazy import _deep_source

    src = tmp_path / "src"
    deep = _deep_source(src, 1500)
    (src / "top.txt").write_bytes(b"top\n")
    server.sync(src)
    server.ingest()
    assert server.cat(deep) == b"deep\n"

    def export() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dittohead", "export", "--store", str(server.root), "--study",
             server.study, str(tmp_path / "out")], capture_output=True, text=True, env=server.proc_env(),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)), check=False)

    try:
        _export_deep_and_check(export, tmp_path, deep)
    finally:  # rm, not pytest's later shutil.rmtree, which recurses in Python: too deep for it
        subprocess.run(["rm", "-rf", "--", str(src), str(tmp_path / "out")], check=True)


def _export_deep_and_check(export, tmp_path: Path, deep: str) -> None:
    from test_view_lazy import _read_deep

    cp = export()
    assert cp.returncode == 0, cp.stderr
    assert _read_deep(tmp_path / "out" / "current", deep) == b"deep\n"
    again = export()
    assert again.returncode == 0 and "0 version files written" in again.stdout, again.stdout + again.stderr


def _commit_by_hand(server: Server, files: dict[bytes, bytes], name: str = "by-hand-1") -> None:
    """A submission as a client of another system would send it: names as given, which this
    filesystem could not hold as source files (a Windows name may be 765 bytes)."""
    import io

    from dittohead import format as fmt
    from dittohead import manifest as mf
    from dittohead import pack as pk
    from dittohead import paths
    from dittohead.chunking import Chunker
    from dittohead.hashing import digest

    buf = io.BytesIO()
    w = pk.PackWriter(buf)
    entries, added = [], set()
    for raw, data in files.items():
        chunks = [(c.id, bytes(c.data)) for c in Chunker().cut_bytes(data)]
        for cid, chunk in chunks:
            if cid not in added:
                w.add(cid, chunk)
                added.add(cid)
        entries.append(mf.Entry(paths.from_bytes(raw), len(data), 1_700_000_000_000_000_000, 0o644, digest(data),
                                tuple((cid, len(c)) for cid, c in chunks)))
    pid, _ = w.finish()
    staging = server.dropbox("inbox") / ("." + name)
    staging.mkdir()
    (staging / (pid.hex() + fmt.PACK_SUFFIX)).write_bytes(buf.getvalue())
    (staging / fmt.MANIFEST_NAME).write_bytes(mf.encode(mf.Manifest(server.study, "win-pc", "ra", "pc", 0,
                                                                     tuple(entries))))
    staging.rename(server.dropbox("inbox") / name)


def test_a_name_the_destination_cannot_hold_is_written_escaped_and_listed(server: Server, tmp_path: Path) -> None:
    """A name of 300 bytes (a Windows name is up to 765) is more than ext4 holds: the export
    writes it escaped and cut (display.portable_name), says so in its summary line, and lists it
    in DEST/escaped-names.tsv, which gives back the view's path; every other name is written
    as it is, and a second export finds the escaped names again and writes nothing."""
    from dittohead.display import portable_name, unescape

    long_dir = "d" * 300
    long_file = "\u00e9" * 150 + ".csv"  # 304 bytes
    files = {f"{long_dir}/inside.txt".encode(): b"in a folder with a long name\n",
             f"short/{long_file}".encode(): b"a file with a long name\n",
             b"short/plain.txt": b"plain\n"}
    _commit_by_hand(server, files)
    server.ingest()
    dest = tmp_path / "out"
    res = export(server, dest)
    assert "6 names this destination refuses written escaped" in res.stdout, res.output
    written = {"current/" + portable_name(long_dir) + "/inside.txt": files[f"{long_dir}/inside.txt".encode()],
               "current/short/" + portable_name(long_file): files[f"short/{long_file}".encode()],
               "current/short/plain.txt": b"plain\n"}
    for rel, data in written.items():
        assert (dest / rel).read_bytes() == data, rel
    lines = (dest / "escaped-names.tsv").read_text(encoding="utf-8").splitlines()
    mapping = {unescape(view).decode(): unescape(w).decode()
               for w, view in (ln.split("\t") for ln in lines if not ln.startswith("#"))}
    # each refused name once, in each of the three trees: the long folder, and the long file
    # (its version files' names are the view's own: NNNN_STAMP_SITE.csv)
    sub = next(p for p in os.listdir(dest / "submissions"))
    assert mapping == {f"{top}/{long_dir}": f"{top}/{portable_name(long_dir)}"
                       for top in ("current", "versions", f"submissions/{sub}")} | {
        f"{top}/short/{long_file}": f"{top}/short/{portable_name(long_file)}"
        for top in ("current", "versions", f"submissions/{sub}")}
    before = snapshot(dest)
    again = export(server, dest)
    assert "written escaped" not in again.stdout and "0 version files written" in again.stdout, again.output
    assert snapshot(dest) == before


def test_an_escaped_name_never_stands_for_another_path(server: Server, tmp_path: Path) -> None:
    """A study may hold a name the destination refuses and, as another file, the very name it
    would be escaped to: the other file keeps its name, and the refused one is reported in the
    way, never written over it or mistaken for it, in this export and the next."""
    from dittohead.display import escape, portable_name

    refused = "x" * 300
    taken = portable_name(refused)
    _commit_by_hand(server, {taken.encode(): b"the file whose own name this is\n",
                             refused.encode(): b"the file this destination cannot name\n"})
    server.ingest()
    dest = tmp_path / "out"
    for _ in range(2):
        res = export(server, dest)
        assert (dest / "current" / taken).read_bytes() == b"the file whose own name this is\n"
        assert escape(str(dest / "versions" / refused)) in res.stderr, res.output  # where it stops
    assert not (dest / "escaped-names.tsv").exists() or refused not in (dest / "escaped-names.tsv").read_text()


def test_an_export_makes_its_files_durable_together_never_one_by_one(server: Server, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The version files are written without an fsync each, made durable by one sync of DEST's
    filesystem, and only then linked under their names: a crash before that sync leaves no file
    under a version's name (only temporaries), and the next export writes them all."""
    from dittohead import fsutil

    src = tmp_path / "src"
    for i in range(60):
        write_file(src / f"d{i % 3}" / f"f{i:02d}.txt", f"file {i}\n".encode() * (i + 1))
    server.sync(src)
    server.ingest()
    fsyncs, syncs = [], []
    real_fsync, real_syncfs = os.fsync, fsutil.sync_filesystem
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    monkeypatch.setattr(fsutil, "sync_filesystem", lambda fd: syncs.append(fd) or real_syncfs(fd))
    dest = tmp_path / "out"
    export(server, dest)
    assert len(fsyncs) < 5 and len(syncs) == 2, (len(fsyncs), len(syncs))  # one flush, one at the end
    for i in range(60):
        assert (dest / "current" / f"d{i % 3}" / f"f{i:02d}.txt").read_bytes() == f"file {i}\n".encode() * (i + 1)

    class Crash(Exception):
        pass

    def crash(fd: int) -> None:
        raise Crash

    monkeypatch.setattr(fsutil, "sync_filesystem", crash)
    dest2 = tmp_path / "out2"
    assert server.run("export", "--store", server.root, "--study", server.study, dest2).exit_code != 0
    names = [p.name for p in (dest2 / "versions").rglob("*") if p.is_file()]
    assert names and all(n.startswith(".tmp-") for n in names), names  # nothing under a version's name
    monkeypatch.setattr(fsutil, "sync_filesystem", real_syncfs)
    export(server, dest2)
    for i in range(60):
        assert (dest2 / "current" / f"d{i % 3}" / f"f{i:02d}.txt").read_bytes() == f"file {i}\n".encode() * (i + 1)
