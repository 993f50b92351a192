"""Logdirs behind fsspec URLs (``s3://``, ``gs://``, any fsspec protocol): listing, ranged reads, clear errors.

The run store and the reader reach remote files only through this module, so that

* a listing is always fresh: fsspec filesystems keep directory listings forever (s3fs and gcsfs never overwrite a
  cached one), which would hide a growing file and new runs. Each listing first forgets what was cached under the
  logdir, and the file sizes and ETags it brings back answer the reader's ``info`` calls until the next listing, so a
  refresh costs one LIST per thousand files, not one request per file;
* a read is one ranged GET of exactly the bytes asked for (a file opened without read-ahead), so a refresh reads
  only what was appended, as for local files;
* a missing bucket or missing credentials is an error that names the URL (:class:`RemoteLogdirError`), never a
  traceback from deep inside botocore.

fsspec and the protocol's package (``s3fs``, ``gcsfs``: the ``[remote]`` extra) are imported on first use only.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: Protocols whose first path component is a bucket (a missing one is named as such).
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")
#: The package that implements each common protocol, for the message when it is not installed.
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class RemoteLogdirError(OSError):
    """A remote logdir cannot be read (no bucket, no credentials, no protocol package): the message names the URL."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path on it (fsspec shares one instance per protocol and options)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = PACKAGES.get(protocol(url))
        hint = f"{package}: pip install 'tb_gradient_plugin[remote]'" if package else f"a package ({exc})"
        raise RemoteLogdirError(f"cannot read {url}: the {protocol(url)}:// protocol needs {hint}") from exc
    except ValueError as exc:
        raise RemoteLogdirError(f"cannot read {url}: {exc}") from exc


def _forget_listings(fs: Any, path: str) -> None:
    """Drop cached listings of ``path``, everything under it and its parents."""
    base = path.rstrip("/")
    for key in [k for k in list(fs.dircache) if k == base or k.startswith(base + "/")]:
        fs.dircache.pop(key, None)
    fs.invalidate_cache(base)


def _explain(url: str, fs: Any, path: str, exc: BaseException) -> RemoteLogdirError:
    """The error to show for a failed listing of ``url``: which bucket is missing, or which credentials."""
    name = type(exc).__name__
    if "Credential" in name or "credential" in str(exc):
        return RemoteLogdirError(f"cannot read {url}: no credentials for {protocol(url)}:// ({name}: {exc}); set "
                                 "them as the protocol's library expects (for s3://: AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")
    if isinstance(exc, PermissionError):
        return RemoteLogdirError(f"cannot read {url}: access denied ({exc})")
    if isinstance(exc, FileNotFoundError) and protocol(url) in BUCKET_PROTOCOLS:
        bucket = path.strip("/").split("/", 1)[0]
        return RemoteLogdirError(f"cannot read {url}: no bucket named {bucket!r} ({exc})")
    return RemoteLogdirError(f"cannot read {url}: {name}: {exc}")


def list_files(url: str) -> tuple[Any, str, list[str]]:
    """(filesystem, base path, every file path under it), listed afresh. A missing directory in an existing bucket
    lists nothing (it may be created later, as for a local logdir); a missing bucket or credentials raise."""
    fs, base = filesystem(url)
    _forget_listings(fs, base)
    try:
        files = fs.find(base, withdirs=False)
        if not files and protocol(url) in BUCKET_PROTOCOLS:
            _require_bucket(fs, base)
    except FileNotFoundError as exc:
        if protocol(url) in BUCKET_PROTOCOLS:
            raise _explain(url, fs, base, exc) from exc
        return fs, base, []
    except RemoteLogdirError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore and google-auth errors are no OSError: say what broke, and where
        raise _explain(url, fs, base, exc) from exc
    return fs, base, files


def _require_bucket(fs: Any, base: str) -> None:
    bucket = base.strip("/").split("/", 1)[0]
    if not fs.exists(bucket):
        raise FileNotFoundError(f"the bucket {bucket!r} does not exist")


def exists(url: str) -> bool:
    """Whether ``url`` names a file or directory; a missing bucket or credentials raise :class:`RemoteLogdirError`."""
    fs, path = filesystem(url)
    _forget_listings(fs, path)
    try:
        if fs.exists(path):  # first: without credentials this raises, where asking for the bucket says "missing"
            return True
        if protocol(url) in BUCKET_PROTOCOLS:
            _require_bucket(fs, path)
        return False
    except RemoteLogdirError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in list_files
        raise _explain(url, fs, path, exc) from exc


def read_range(fs: Any, path: str, offset: int, n: int) -> bytes:
    """Exactly ``n`` bytes from ``offset`` (fewer at the end of the file), in one ranged request: no read-ahead
    cache, which would fetch a whole block (5 MB on s3fs) for the 64 bytes that say whether a file is still the
    same one. The size comes from the last listing, so opening costs no request."""
    if n <= 0:
        return b""
    with fs.open(path, "rb", cache_type="none") as f:
        f.seek(offset)
        return f.read(n)


def tensorboard_reads(url: str) -> bool:
    """Whether TensorBoard's own loaders can open ``url``, the check TensorBoard makes at start-up: without
    TensorFlow its stub reads any fsspec URL; with TensorFlow, only the schemes TensorFlow registered (``gs://``) or
    those tensorflow-io adds."""
    if "://" not in url or url.startswith("file://"):
        return True
    from tensorboard.compat import tf

    if getattr(tf, "__version__", "stub") == "stub":
        return True
    if importlib.util.find_spec("tensorflow_io") is not None:
        return True
    schemes = getattr(tf.io.gfile, "get_registered_schemes", None)
    return schemes is not None and protocol(url) in schemes()
