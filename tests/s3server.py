"""A real S3-compatible server for tests: moto's standalone server on a free loopback port, reached through s3fs.

Usage::

    with S3Server() as s3:
        s3.env            # AWS_* variables that point s3fs/botocore at it, with fake credentials
        s3.bucket()       # a new empty bucket, its name returned

The variables are also set in this process while the server runs (and restored afterwards), and s3fs' shared
instances are dropped at both ends, so an ``s3://`` URL opened in the test reaches this server.
"""

from __future__ import annotations

import logging
import os
import uuid

#: Credentials moto accepts (it does not check them); no profile or instance metadata lookup.
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
}


def without_credentials(env: dict[str, str]) -> dict[str, str]:
    """``env`` with no AWS credentials anywhere (the endpoint kept)."""
    out = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                      "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    out.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    return out


class BucketServer:
    """What the S3 and GCS test servers share: their filesystem, new buckets, uploads."""

    protocol = ""

    def fs(self):
        import fsspec

        return fsspec.filesystem(self.protocol)

    def bucket(self) -> str:
        name = f"logs-{uuid.uuid4().hex[:12]}"
        self.fs().mkdir(name)
        return name

    def upload(self, local: os.PathLike | str, url: str) -> None:
        """Every file under ``local`` to the same relative path under ``url``, whole (as a sync tool uploads)."""
        fs, root = self.fs(), os.fspath(local)
        base = url.split("://", 1)[-1].rstrip("/")
        for directory, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                with open(path, "rb") as f:
                    fs.pipe(base + "/" + rel, f.read())


class S3Server(BucketServer):
    protocol = "s3"

    def __init__(self) -> None:
        self.endpoint = ""
        self.env: dict[str, str] = {}
        self._server = None
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = dict(FAKE_ENV, AWS_ENDPOINT_URL=self.endpoint)
        self._saved = set_environ(self.env)
        _drop_instances()
        return self

    def __exit__(self, *exc: object) -> None:
        set_environ(self._saved)
        _drop_instances()
        if self._server is not None:
            self._server.stop()



def set_environ(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, remove) environment variables of this process; returns what they were, to set back."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return saved


def _drop_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
