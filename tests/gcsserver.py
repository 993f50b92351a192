"""A real Google Cloud Storage JSON API server for tests: ``gcp-storage-emulator`` on a free loopback port, in memory,
reached through gcsfs (``STORAGE_EMULATOR_HOST``).

Usage::

    with GCSServer() as gcs:
        gcs.bucket()       # a new empty bucket, its name returned
        gcs.upload(local_dir, "gs://bucket/logs")

The variables are set in this process while the server runs (and restored afterwards), and gcsfs' shared instances
are dropped at both ends, so a ``gs://`` URL opened in the test reaches this server. No credentials are looked up:
the emulator accepts anonymous requests.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from s3server import BucketServer, set_environ

ENV = {
    "NO_GCE_CHECK": "true",  # no metadata-server probe for credentials
    "GOOGLE_APPLICATION_CREDENTIALS": "",
    # gcsfs asks a gRPC control plane for a bucket's layout (hierarchical namespace): the emulator has none
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer(BucketServer):
    protocol = "gs"

    def __init__(self) -> None:
        self.endpoint = ""
        self.env: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> GCSServer:
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        command = [str(Path(sys.executable).with_name("gcp-storage-emulator")), "start", "--port", str(port),
                   "--host", "127.0.0.1", "--in-memory", "--quiet"]
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.env = dict(ENV, STORAGE_EMULATOR_HOST=self.endpoint)
        self._saved = set_environ(self.env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    self.__exit__()
                    raise RuntimeError(f"the GCS emulator did not start: {err[-2000:]}") from None
                time.sleep(0.1)
        _drop_instances()
        return self

    def __exit__(self, *exc: object) -> None:
        set_environ(self._saved)
        _drop_instances()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)



def _drop_instances() -> None:
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
