"""Writes with one commit point: a folder is staged beside its target and swapped in at once.

Everything a write produces goes to a staging folder next to the target, ``.<name>.staging-<pid>-<hex>`` (the same file
system, so renames are atomic). Only once all of it is written is it swapped with the target in one step: Linux's
``renameat2(RENAME_EXCHANGE)`` exchanges the two folders atomically (where that is missing: the old folder is renamed
aside as ``.<name>.old-<pid>-<hex>``, then the new one in; a run killed between the two renames is repaired by the
next write, which puts the old one back). Until that point the target is untouched; after it, the previous content
(now in the staging folder) is deleted.

- ``carry=True`` (a folder holding several exports): the target's entries that this write does not produce are
  carried over into the staging folder as hard links (no data copied), so the swap replaces only what was written.
- Leftovers of a process that no longer runs (a staging, ``.old`` or ``.tmp`` sibling named with its pid; older
  releases' ``.<name>.tmp-XXXXXXXX`` folders) are removed by the next write beside them, which logs a line saying so.
- Files and folders get the modes the umask gives (0644/0755 under umask 022), not the 0600/0700 of tempfile or
  safetensors.
- An OSError while writing is re-raised naming the final path (not the staging one) and the cause: disk full,
  file-size limit, permission denied (or an immutable folder), read-only file system.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from lightning_lora.io.lock import pid_alive

log = logging.getLogger(__name__)

_KINDS = ("staging", "old", "tmp")
_PRIVATE = re.compile(r"\.([^/]+?)\.(?:staging|old|tmp)-(?:\d+-)?[0-9A-Za-z_]+(?=/|$)")
_CAUSES = {
    errno.ENOSPC: ("disk full", "free some space and run it again"),
    errno.EDQUOT: ("disk quota exceeded", "free some of your quota and run it again"),
    errno.EFBIG: ("file-size limit reached (ulimit -f)", "raise the limit (ulimit -f unlimited) and run it again"),
    errno.EACCES: ("permission denied", "make the folder writable or choose another one"),
    errno.EPERM: ("operation not permitted (an immutable or protected file or folder?)",
                  "make it writable (lsattr/chattr -i, chmod) or choose another folder"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable file system"),
}  # fmt: skip


def private_name(target: Path, kind: str) -> Path:
    """A fresh sibling of ``target`` for ``kind`` in ``_KINDS``, named with this process's pid."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale(target: Path) -> list[Path]:
    """Remove the leftovers of killed writes beside ``target`` (their pid no longer runs); return what was removed.
    A ``.old`` folder whose target is missing is the previous content of a swap cut in half: it is put back."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.({'|'.join(_KINDS)})-(?:(\d+)-)?[0-9A-Za-z_]+$")
    removed = []
    try:
        siblings = sorted(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or (match.group(2) is not None and pid_alive(int(match.group(2)))):
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            os.rename(path, target)
            log.warning("restored %s from %s, left by an interrupted write", target, path.name)
            continue
        try:
            _remove(path)
        except OSError as err:  # e.g. an immutable file in it: it stays, and the write goes on
            log.warning("could not remove %s, left by an interrupted write (%s)", path, err)
            continue
        removed.append(path)
        log.warning("removed %s, left by an interrupted write (its process no longer runs)", path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(stage: Path, target: Path) -> None:
    """Make ``stage`` the ``target`` in one step; afterwards ``stage`` holds the previous content (if any)."""
    if not os.path.lexists(target):
        os.rename(stage, target)
    elif not _exchange(stage, target):
        old = private_name(target, "old")
        os.rename(target, old)
        os.rename(stage, target)
        os.rename(old, stage)


def umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old


def apply_umask(root: Path) -> None:
    """Give every folder and file under ``root`` (itself included) 0o777/0o666 minus the umask: some writers
    (safetensors) create private 0600 files whatever the umask."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (a plain copy where a link is refused)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        os.mkdir(dst)
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _carry_over(target: Path, stage: Path) -> None:
    for entry in target.iterdir():
        if os.path.lexists(stage / entry.name):
            continue  # written by this transaction: the new one replaces it
        if _PRIVATE.fullmatch(entry.name):  # a killed write's leftover inside the target: not carried
            log.warning("removed %s, left by an interrupted write", entry)
            continue
        _link_tree(entry, stage / entry.name)


def describe(err: BaseException, target: Path, stage: Path | None = None, path: Path | None = None) -> OSError | None:
    """An OSError naming the final path and the cause of ``err`` (an OSError, or a library error that wraps one, as
    safetensors' ``(os error 27)``); None when ``err`` is no I/O error. Staging names are shown as the final ones,
    and an error already described by an inner write keeps its path but names the outermost ``target``."""
    where = getattr(err, "lightning_lora_where", None)
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(err))
        code = int(found.group(1) or found.group(2)) if found else None
    if code is None and not isinstance(err, OSError):
        return None
    if where is None:
        where = str(getattr(err, "filename", None) or path or target)
        if stage is not None and where.startswith(str(stage)):
            where = str(target) + where[len(str(stage)) :]
        where = _PRIVATE.sub(r"\1", where)
    shown = _PRIVATE.sub(r"\1", str(target))
    cause, fix = _CAUSES.get(code, (os.strerror(code) if code else str(err), "check the folder and run it again"))
    fix = fix[:1].upper() + fix[1:]
    text = f"writing {where} failed: {cause}. {fix}; the previous content of {shown} is unchanged."
    new = OSError(code, text) if code is not None else OSError(text)
    new.lightning_lora_where = where
    return new


@contextlib.contextmanager
def naming(target: Path, stage: Path | None = None, path: Path | None = None) -> Iterator[None]:
    """Re-raise I/O errors of the block as ``describe`` words them (``path``: what the block writes, when the error
    does not say)."""
    try:
        yield
    except Exception as err:
        new = describe(err, target, stage, path)
        if new is None:
            raise
        raise new from (err.__cause__ if hasattr(err, "lightning_lora_where") else err)


def check_folder_target(target: Path, swapped: bool = False) -> None:
    """Refuse a target that exists but is not a folder, naming it; and, for a folder to be swapped, the current
    folder or one holding it (the swap would leave this process in the deleted old folder)."""
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file, not a folder; choose a folder path (or move the file away).")
    here, there = Path.cwd().resolve(), Path(target).resolve()
    if swapped and (here == there or there in here.parents):
        raise ValueError(f"{target} is the current folder or holds it; write into a folder of its own (e.g. {target}/out).")


@contextlib.contextmanager
def staged(target: str | os.PathLike, carry: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block ends without error it becomes ``target`` in
    one step (``carry``: keeping the entries of the old ``target`` the block did not write). On error, or if the
    process is killed, ``target`` is exactly as it was."""
    target = Path(target)
    check_folder_target(target, swapped=True)
    target = target.resolve() if target.is_symlink() else target  # swap the folder, keep the link
    with naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        stage = private_name(target, "staging")
        os.mkdir(stage)  # mode 0o777 minus the umask
    try:
        with naming(target, stage):
            yield stage
            apply_umask(stage)
            if carry and target.is_dir():
                _carry_over(target, stage)
            _swap_in(stage, target)
    finally:
        try:
            _remove(stage)  # the staging folder, or after the swap the previous content
        except OSError as err:  # e.g. an immutable file in the previous content: the next write retries
            log.warning("could not remove %s (%s); the next write will retry", stage, err)


__all__ = ["apply_umask", "check_folder_target", "describe", "naming", "private_name", "remove_stale", "staged",
           "umask"]
