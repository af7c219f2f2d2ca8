"""Writing outputs that are complete or absent and never harm what the user owns.

Every directory dem-jax writes (models, vectors, search and mixture results) goes
through :func:`atomic_directory`. Its rules, each there because a user once lost
files without it:

* **Never onto an input.** :func:`check_disjoint` refuses an output that is,
  contains or lies inside any of the command's inputs (``merge … --out BASE
  --overwrite`` would otherwise replace the base it reads).
* **Replace only our own kind.** ``--overwrite`` replaces an existing directory
  only when it holds one of the files that mark a dem-jax output of that kind
  (a model's ``config.json`` + ``*.safetensors`` or ``dem_jax_model.json``, a
  vector's ``dem_jax_vector.json``...) or is empty; a plain file or a folder of
  anything else is refused.
* **One writer at a time.** A lock file beside the output (``.NAME.lock``, held
  with ``flock`` for the whole write, released by the kernel if the process
  dies) makes a second concurrent writer exit with a clear error instead of
  deleting the first one's temporary directory. Each write has its own
  temporary name.
* **Recoverable replacement.** ``--overwrite`` swaps old for new with two
  renames. A journal (``.NAME.swap.json``) written before the first rename lets
  the next write to the same path finish an interrupted swap (or restore the
  old output), say which, and remove every hidden leftover.

Object stores (``gs://``) have no rename and no lock: the move copies object by
object behind an *incomplete* marker (see :mod:`dem_jax.io.storage`), and
concurrent writers to one URL are not detected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.lazy import process_count, process_index

# Files that mark a directory as a model dem-jax may replace (dem-jax's own
# metadata file, or a Hugging Face config beside safetensors weights).
MODEL_SIGNATURE = ("dem_jax_model.json", "config.json")


def check_disjoint(
    out: storage.PathLike,
    inputs: Iterable[tuple[str, Any]],
    flag: str,
    contains_ok: bool = False,
) -> None:
    """DemError if ``out`` is, contains or lies inside any input path.

    ``inputs`` are ``(what, path)`` pairs (``None`` paths are skipped); symlinks
    are resolved, so two spellings of one directory are caught. ``contains_ok``
    allows inputs inside ``out`` (a run directory that holds its config file).
    """
    o = _key(out)
    for what, p in inputs:
        if p is None:
            continue
        i = _key(p)
        if o == i:
            rel = "is"
        elif _inside(o, i):
            rel = "lies inside"
        elif _inside(i, o) and not contains_ok:
            rel = "contains"
        else:
            continue
        raise DemError(
            f"{out}: {flag} {rel} the {what} {p}; writing there could destroy an input, "
            f"choose another {flag}"
        )


def is_within(child: Any, parent: Any) -> bool:
    """``child`` is ``parent`` or lies inside it (symlinks resolved)."""
    c, p = _key(child), _key(parent)
    return c == p or _inside(c, p)


def _key(p: Any) -> str:
    s = os.fspath(storage.path(p))
    if storage.is_url(s):
        return s.rstrip("/")
    return os.path.realpath(s)


def _inside(child: str, parent: str) -> bool:
    return child.startswith(parent.rstrip("/") + "/")


def check_output(out: storage.PathLike, format: str, overwrite: bool) -> None:
    """``format`` is ``"hf"`` or ``"orbax"`` and ``out`` is free (or a model that may be
    replaced); called before any work."""
    if format not in ("orbax", "hf"):
        raise DemError(f"--format: must be 'hf' or 'orbax', got {format!r}")
    check_writable(out, overwrite)


def check_writable(
    dst: storage.PathLike, overwrite: bool, signature: Sequence[str] = MODEL_SIGNATURE
) -> None:
    """DemError unless ``dst`` may be written: absent, or (with ``overwrite``) an
    empty directory or one holding a file of ``signature``. Call it before any
    work, so a refused output costs nothing."""
    dst = storage.path(dst)
    if not storage.parent_exists(dst):
        raise DemError(f"{dst.parent}: output's parent directory does not exist")
    if not dst.exists():
        return
    if not overwrite:
        raise DemError(f"{dst}: output already exists (pass --overwrite to replace it)")
    if not dst.is_dir():
        raise DemError(f"{dst}: output exists and is a file, not a dem-jax output; not replacing")
    if not _is_own(dst, signature):
        names = " or ".join(signature)
        raise DemError(
            f"{dst}: output exists and is not a dem-jax output (no {names}); "
            "--overwrite replaces only dem-jax outputs, so move it away or choose another path"
        )


def _is_own(dst: Any, signature: Sequence[str]) -> bool:
    if not any(True for _ in dst.iterdir()):
        return True
    for name in signature:
        if (dst / name).is_file():
            if name != "config.json":
                return True
            # A bare config.json is anybody's file; beside safetensors it is a model.
            if any(dst.glob("*.safetensors")):
                return True
    return False


@contextlib.contextmanager
def atomic_directory(
    dst: storage.PathLike,
    overwrite: bool = False,
    signature: Sequence[str] = MODEL_SIGNATURE,
) -> Iterator[Any]:
    """Yield a temporary sibling of ``dst`` to fill; move it to ``dst`` on success.

    On any error the temporary directory is removed and ``dst`` is untouched, so
    readers see either the complete output or nothing new. With ``overwrite`` an
    existing ``dst`` (of the kind ``signature`` names; see :func:`check_writable`)
    is replaced only after the new one is complete. With several JAX processes
    every process must enter (Orbax saves are collective); process 0 alone locks,
    creates and moves, and the temporary name is shared.
    """
    dst = storage.path(dst)
    multi = process_count() > 1
    main = process_index() == 0
    with contextlib.ExitStack() as stack:
        error = ""
        if main:
            try:
                if not storage.is_url(dst):
                    if not dst.parent.is_dir():  # the lock file lives there
                        raise DemError(f"{dst.parent}: output's parent directory does not exist")
                    stack.enter_context(_lock(dst))
                    _recover(dst)
                check_writable(dst, overwrite, signature)
            except DemError as e:
                error = str(e)
        suffix = _shared_suffix(multi, error)
        if suffix is None:
            raise DemError(error or f"{dst}: refused on process 0")
        tmp = dst.parent / f".{dst.name}.tmp-{suffix}"
        if main:
            storage.makedirs(tmp)
        _barrier(multi, f"atomic_directory:create:{dst}")
        try:
            yield tmp
            _barrier(multi, f"atomic_directory:filled:{dst}")
            if main:
                _move_into_place(tmp, dst)
            _barrier(multi, f"atomic_directory:renamed:{dst}")
        except BaseException:
            if main:
                storage.rmtree(tmp)
            raise


def _shared_suffix(multi: bool, error: str) -> str | None:
    """A fresh temporary-name suffix, the same on every process; None if process 0
    refused the output (then every process raises, instead of waiting forever)."""
    value = -1 if error else int(uuid.uuid4().int % 2**31)
    if multi:
        from jax.experimental import multihost_utils

        value = int(multihost_utils.broadcast_one_to_all(np.int32(value)))
    return None if value < 0 else f"{value:08x}"


@contextlib.contextmanager
def _lock(dst: Any) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``dst`` (flock, non-blocking) for the write."""
    import fcntl

    lock = dst.parent / f".{dst.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DemError(
                    f"{dst}: another dem-jax process is writing this output now; "
                    "wait for it or choose another path"
                ) from None
            raise
        # The holder before us may have unlinked the file after we opened it:
        # then our lock is on a dead inode, so take the lock again on the new one.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def recover(dst: storage.PathLike) -> None:
    """Finish or undo an interrupted ``--overwrite`` of a local ``dst`` (saying which on
    stderr) and delete leftovers of killed writes; a no-op when there are none."""
    dst = storage.path(dst)
    if storage.is_url(dst) or not storage.parent_exists(dst):
        return
    if not any(dst.parent.glob(f".{dst.name}.*")):
        return
    with _lock(dst):
        _recover(dst)


def _journal(dst: Any) -> Any:
    return dst.parent / f".{dst.name}.swap.json"


def _note(message: str) -> None:
    print(f"dem-jax: {message}", file=sys.stderr, flush=True)


def _recover(dst: Any) -> None:
    """Finish or undo an interrupted replacement of ``dst`` and delete leftovers
    of killed writes. Runs with the lock held, so no other writer is active."""
    journal = _journal(dst)
    if journal.exists():
        try:
            entry = json.loads(journal.read_text())
            old, new = dst.parent / entry["old"], dst.parent / entry["new"]
        except (ValueError, KeyError, TypeError):
            old = new = None
        if old is not None:
            if new.exists():  # the new output was complete before the swap began
                if dst.exists():
                    os.replace(dst, old)
                os.replace(new, dst)
                _note(f"{dst}: finished an interrupted --overwrite (the new output is in place)")
            elif not dst.exists() and old.exists():
                os.replace(old, dst)
                _note(f"{dst}: restored the previous output after an interrupted --overwrite")
            if old.exists():
                shutil.rmtree(old)
        journal.unlink()
    for stale in sorted(dst.parent.glob(f".{dst.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
        _note(f"{dst}: removed {stale.name}, left by a write that was killed")
    for stale in sorted(dst.parent.glob(f".{dst.name}.old-*")):
        if dst.exists():
            shutil.rmtree(stale, ignore_errors=True)
            _note(f"{dst}: removed {stale.name}, a previous version left by a killed write")
        else:
            os.replace(stale, dst)
            _note(f"{dst}: restored the previous output from {stale.name}")


def _move_into_place(tmp: Any, dst: Any) -> None:
    if not storage.is_url(dst):
        if not dst.exists():
            os.replace(tmp, dst)
            return
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        journal = _journal(dst)
        storage.write_text(journal, json.dumps({"old": old.name, "new": tmp.name}) + "\n")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old)
        journal.unlink()
        return
    marker = dst / storage.INCOMPLETE_MARKER
    marker.write_text("moving into place\n")
    for f in dst.iterdir():  # --overwrite: the old content goes once the new is complete
        if f.name != storage.INCOMPLETE_MARKER:
            f.rmtree() if f.is_dir() else f.unlink()
    for f in tmp.iterdir():
        storage.replace(f, dst / f.name)
    marker.unlink()
    storage.rmtree(tmp)


def _barrier(multi: bool, name: str) -> None:
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
