"""Writing files and folders so that a crash, a kill or a full disk never leaves a half-written one under its name.

`atomic_file` (results, stage stamps, histories, caches) and `atomic_folder` (checkpoints) write beside the target
and rename into place; a folder gets a `manifest.json` (each file's size and sha256) last, which `folder_problem`
verifies, and `recover_folder` puts back the complete copy that a kill between two renames left aside.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "semantic-llm-pruning-manifest/1"
# `.<kind>-<name>-<8 hex>` siblings of a folder: a replace's new copy (tmp), the copy it moved aside (old), and a
# folder being deleted (removed, renamed first so that a half-deleted folder never carries another kind's name)
_STRAY = re.compile(r"^\.(tmp|old|removed)-(?P<name>.+)-[0-9a-f]{8}$")


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{kind}-{final.name}-{uuid.uuid4().hex[:8]}"


def stray_owner(folder: str | os.PathLike) -> str | None:
    """Return the name of the folder a stray sibling (`.tmp-/.old-/.removed-<name>-<id>`) belongs to, or None."""
    m = _STRAY.match(Path(folder).name)
    return m["name"] if m else None


def strays_of(final: str | os.PathLike, kinds: tuple[str, ...] = ("tmp", "old", "removed")) -> list[Path]:
    """Return the stray siblings of `final` of the given kinds that interrupted saves left, newest first."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.iterdir()
             if (m := _STRAY.match(p.name)) and m["name"] == final.name and m[1] in kinds and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (a folder: its entries, so a rename survives a power cut); skipped for
    folders on Windows, which cannot open them."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Flush every file of `folder` to disk, then write (and flush) `manifest.json`: each file's size and sha256.

    Written last, so a folder whose manifest verifies (`folder_problem`) is complete; returns the manifest's path.
    """
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            fsync_path(p)
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    for d in [d for d in folder.rglob("*") if d.is_dir()] + [folder]:
        fsync_path(d)
    # atomic and flushed: a manifest rewritten in a finished folder (`checkpoint.record_extra`) is never half there
    return write_text_atomic(folder / MANIFEST_FILE, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Return what is wrong with a folder by its manifest (a file missing, truncated or changed), or None when it
    verifies or has no manifest (written before manifests existed: nothing to check)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err.__class__.__name__}: {err})"
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing (the manifest lists it, {rec['size']} bytes)"
        size = p.stat().st_size
        if size < rec["size"]:
            return f"{rel} is truncated or was changed: {size} of the {rec['size']} bytes written"
        if size > rec["size"]:
            return f"{rel} was changed after it was written: {size} bytes where {rec['size']} were written"
        if _sha256(p) != rec["sha256"]:
            return f"{rel} was changed after it was written (its sha256 differs from the manifest's)"
    return None


def is_complete(folder: str | os.PathLike) -> bool:
    """Return True when `folder` has a manifest and every file it lists is there, whole and unchanged."""
    return (Path(folder) / MANIFEST_FILE).is_file() and folder_problem(folder) is None


def discard_folder(folder: str | os.PathLike) -> None:
    """Delete a folder, renamed to `.removed-<name>-<id>` first: a deletion cut short leaves no half folder under a
    name that a reader or `recover_folder` trusts."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder
    if not folder.name.startswith(".removed-"):
        trash = _sibling(folder.with_name(stray_owner(folder) or folder.name), "removed")  # a stray: its owner's name
        os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_folder(final: str | os.PathLike) -> bool:
    """When `final` is missing, put back the copy an interrupted `atomic_folder` replace left; returns whether it did.

    The copy moved aside (`.old-`, the last one readers saw: complete unless its manifest says otherwise) wins over a
    new copy (`.tmp-`, complete only when its manifest verifies); newest first. Other strays stay for the next save.
    """
    final = Path(final)
    if final.exists():
        return False
    copies = [p for p in strays_of(final, ("old",)) if folder_problem(p) is None]
    copies += [p for p in strays_of(final, ("tmp",)) if is_complete(p)]
    if not copies:
        return False
    os.replace(copies[0], final)
    fsync_path(final.parent)
    return True


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    Never is there no complete copy: the new folder gets its manifest (`write_manifest`, files flushed to disk) before
    the previous one is moved aside (`.old-<name>-<id>`) and the new one renamed into place. A crash between the two
    renames leaves no folder under the name, but `recover_folder` (which loaders and the stage runner call) renames
    the old one back. A successful replace then deletes every stray that earlier interrupted saves of the name left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        if final.exists():
            os.replace(final, _sibling(final, "old"))
        os.replace(tmp, final)
        fsync_path(final.parent)
        for stray in strays_of(final):
            discard_folder(stray)
    except BaseException:
        recover_folder(final)  # an error between the two renames: the old copy goes back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write the file to; on success it is flushed to disk and renamed onto
    `final`, on error deleted.

    A full disk or a crash mid-write leaves the previous file whole (or no file), never a truncated one that the next
    reader would choke on. Results, stage stamps, histories and caches are all written this way.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)  # same folder, same filesystem: the rename is atomic
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` as UTF-8 to `path` through `atomic_file`; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
