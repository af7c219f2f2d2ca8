"""Local paths and object-store URLs (``gs://bucket/...``) behind one small API.

Every path a user gives (model, data, tokenizer, ``output_dir``, ``--out``) goes
through :func:`path`: local paths become :class:`pathlib.Path`, URLs become
:class:`etils.epath.Path` (fsspec underneath: ``gcsfs`` for ``gs://``). Both
answer the same pathlib calls (``/``, ``exists``, ``is_dir``, ``iterdir``,
``open``, ``read_text``...), so the code that uses them does not branch.
Orbax and TensorStore take either kind directly.

What object stores lack, and what we do instead:

* **No directory rename.** :func:`dem_jax.io.modeldir.atomic_directory` writes into a
  temporary sibling and moves it object by object, with an *incomplete* marker
  (:data:`INCOMPLETE_MARKER`) in the destination while the move runs; readers
  refuse a directory that holds it (:func:`check_complete`).
* **No append.** Small files are rewritten whole (:func:`write_text`); one PUT
  is atomic on GCS.
* **No memory maps.** Safetensors reads fetch byte ranges (:func:`read_range`).
* **No local path for libraries that need one** (tokenizers): :func:`local_copy`
  downloads a small directory into a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

from dem_jax.errors import DemError

INCOMPLETE_MARKER = ".dem_jax_incomplete"  # present while a directory is being moved into place

PathLike = str | os.PathLike
AnyPath = Any  # pathlib.Path or etils.epath.Path: the same pathlib-style API


def is_url(p: PathLike) -> bool:
    """True for ``scheme://...`` (gs://, s3://...), False for a local path."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> AnyPath:
    """A pathlib-style object for a local path or an object-store URL."""
    if isinstance(p, pathlib.Path):
        return p
    s = os.fspath(p)
    if not is_url(s):
        return pathlib.Path(s)
    if s.startswith("file://"):
        return pathlib.Path(s[len("file://") :])
    _configure_fsspec(s)
    from etils import epath

    return epath.Path(s)


def join(p: PathLike, *parts: str) -> AnyPath:
    """``path(p) / part / ...``."""
    out = path(p)
    for part in parts:
        out = out / part
    return out


def absolute(p: PathLike) -> AnyPath:
    """An absolute local path (Orbax requires one), or the URL unchanged."""
    p = path(p)
    return p if is_url(p) else p.absolute()


_configured: set[str] = set()


def _configure_fsspec(url: str) -> None:
    """Check the filesystem's package is installed, and turn off fsspec's listing
    cache: files written by TensorStore or by other hosts would otherwise stay
    invisible to a process that listed the directory earlier."""
    scheme = url.split("://", 1)[0]
    if scheme in _configured:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        hint = " (pip install gcsfs)" if scheme in ("gs", "gcs") else ""
        raise DemError(f"{url}: cannot open {scheme}:// paths{hint}: {e}") from None
    fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)
    _configured.add(scheme)


def rmtree(p: PathLike) -> None:
    """Delete a directory tree if it exists."""
    p = path(p)
    if is_url(p):
        if p.exists():
            p.rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def write_text(p: PathLike, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never half.

    Local: a temporary sibling renamed over ``p``. Object store: one upload,
    which becomes visible only once complete.
    """
    write_bytes(p, text.encode("utf-8"))


def write_bytes(p: PathLike, data: bytes) -> None:
    """Bytes version of :func:`write_text`."""
    p = path(p)
    if is_url(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp's 0600, widened as open() would create it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def replace(src: PathLike, dst: PathLike) -> None:
    """Move a file or directory to ``dst`` (which must not exist for a directory).

    On object stores this is a server-side copy of every object, then their deletion
    (gcsfs's own ``mv`` is avoided: its fallback path can hang when the newer
    move API is not available).
    """
    if not is_url(src):
        os.replace(src, dst)
        return
    fs = _filesystem(src)
    s, d = fs._strip_protocol(os.fspath(src)), fs._strip_protocol(os.fspath(dst))
    if fs.isdir(s):
        files = fs.find(s)
        for f in files:
            fs.cp_file(f, d + f[len(s) :])
        fs.rm(files)
    else:
        fs.cp_file(s, d)
        fs.rm(s)


def _filesystem(url: PathLike) -> Any:
    """The fsspec filesystem of a URL."""
    import fsspec

    _configure_fsspec(os.fspath(url))
    return fsspec.core.url_to_fs(os.fspath(url))[0]


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy one file between any two locations (local or URL)."""
    src, dst = path(src), path(dst)
    if not is_url(src) and not is_url(dst):
        shutil.copy2(src, dst)
        return
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 * 2**20)


def makedirs(p: PathLike) -> None:
    """Create a directory and its parents (a no-op on object stores, which have none)."""
    p = path(p)
    if not is_url(p):
        p.mkdir(parents=True, exist_ok=True)


def parent_exists(p: PathLike) -> bool:
    """Whether ``p`` can be created: its parent directory exists (always, on object stores)."""
    p = path(p)
    return is_url(p) or p.parent.exists()


def read_range(p: PathLike, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file, fetched without reading the rest."""
    if is_url(p):
        return _filesystem(p).cat_file(os.fspath(p), start=start, end=end)
    with open(p, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def file_size(p: PathLike) -> int:
    """Size of a file in bytes."""
    p = path(p)
    return p.stat().length if is_url(p) else p.stat().st_size


def version_stamp(p: PathLike) -> str:
    """A string that changes whenever the file is rewritten: its modification time in
    ns locally; on object stores the object's generation (or update time / etag)."""
    p = path(p)
    if not is_url(p):
        return str(p.stat().st_mtime_ns)
    info = _filesystem(p).info(os.fspath(p))
    keys = ("generation", "updated", "mtime", "etag")
    return str(next((info[k] for k in keys if info.get(k)), ""))


def check_complete(p: PathLike) -> None:
    """DemError if ``p`` is a directory whose move into place never finished."""
    p = path(p)
    if is_url(p) and (p / INCOMPLETE_MARKER).exists():
        raise DemError(
            f"{p}: incomplete output (a write was interrupted while moving it into place); "
            "delete it and run again"
        )


def local_copy(p: PathLike) -> pathlib.Path:
    """A local directory (or file) with the content of ``p``: ``p`` itself when local,
    else a download into a cache keyed by the URL (top-level files only; meant for
    tokenizer directories and configs, which are small)."""
    p = path(p)
    if not is_url(p):
        return p
    # Per process: local processes of one multi-host test must not race on one copy.
    key = hashlib.sha256(f"{os.fspath(p)}:{os.getpid()}".encode()).hexdigest()[:16]
    root = pathlib.Path(tempfile.gettempdir()) / "dem-jax-remote" / key
    if not p.is_dir():
        dst = root / p.name
        root.mkdir(parents=True, exist_ok=True)
        copy_file(p, dst)
        return dst
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkdir(root.parent)))
    try:
        for f in p.iterdir():
            if f.is_file():
                copy_file(f, tmp / f.name)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _mkdir(p: pathlib.Path) -> pathlib.Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def read_json(path: AnyPath) -> dict[str, Any]:
    """A JSON object from a file, or a DemError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DemError(f"{path}: file not found") from None
    except OSError as e:  # a directory, no permission
        raise DemError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DemError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DemError(f"{path}: expected a JSON object")
    return data
