"""Start and stop a real ``tensorboard`` process for tests (plugin routes, browser tests).

The server binds port 0 on the loopback interface, so the kernel picks a free port and no two tests race for one;
the real URL is read from TensorBoard's own start-up line. Usage::

    with TensorBoardServer(logdir, extra_args=["--load_fast=false"]) as tb:
        tb.get_json("data/plugins_listing")      # relative to tb.url (which ends with "/", path prefix included)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

_URL_LINE = re.compile(r"TensorBoard \S+ at (http://\S+?/?) \(Press CTRL\+C to quit\)")


class TensorBoardError(RuntimeError):
    """The server did not come up (its output is in the message)."""


class TensorBoardServer:
    """A ``tensorboard`` subprocess on a free loopback port, ready once the context is entered.

    ``logdir`` may be ``None`` when ``extra_args`` carries ``--logdir_spec``. ``reload_interval`` is passed as
    ``--reload_interval`` (TensorBoard's own loaders; short by default so tests see new data quickly).
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None,
        *,
        extra_args: Sequence[str] = (),
        reload_interval: float = 1.0,
        timeout: float = 90.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [sys.executable, "-m", "tensorboard.main", "--host", "127.0.0.1", "--port", "0",
                     f"--reload_interval={reload_interval}"]
        if logdir is not None:
            self.args += ["--logdir", os.fspath(logdir)]
        self.args += list(extra_args)
        self.timeout = timeout
        self.env = env
        self.url = ""
        self._proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._url_seen = threading.Event()
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> TensorBoardServer:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", env=env,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True, name="tensorboard-output")
        self._reader.start()
        deadline = time.monotonic() + self.timeout
        while not self._url_seen.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._fail("did not print its URL")
        while True:
            try:
                self.get("data/environment", timeout=5)
                return self
            except (urllib.error.URLError, OSError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._fail("did not answer HTTP")
                time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the process (kill it if it does not exit within 10 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> TensorBoardServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        return "".join(self._lines)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)
            match = _URL_LINE.search(line)
            if match and not self._url_seen.is_set():
                self.url = match.group(1).rstrip("/") + "/"
                self._url_seen.set()

    def _fail(self, what: str) -> None:
        self.stop()
        raise TensorBoardError(f"tensorboard {what}: {' '.join(self.args)}\n{self.output}")

    # ----------------------------------------------------------------------------------------------------- requests

    def get(self, path: str, *, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """GET ``path`` relative to :attr:`url`; returns (status, headers, body) for any status code."""
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=timeout) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers.items()), err.read()

    def get_json(self, path: str, *, timeout: float = 30.0) -> Any:
        """GET ``path`` and decode JSON; raises ``AssertionError`` with the body on a non-200 answer."""
        status, _, body = self.get(path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body)
