"""scripts/fetch_realruns.py: files land at their pinned bytes, or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path

from scripts.fetch_realruns import MANIFEST, RealRunFile, blob_id, fetch, local_path, main, missing


def _mirror(root: Path, files: list[RealRunFile], content: dict[str, bytes]) -> str:
    """A directory served as ``file://`` in the raw-file layout ``<owner>/<name>/<commit>/<path>``."""
    for f in files:
        owner, name = f.repo.split("__", 1)
        target = root / owner / name / f.commit / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content[f.path])
    return root.as_uri()


def test_a_file_whose_bytes_differ_is_reported_and_not_written(tmp_path):
    good, bad = b"real event bytes", b"the pinned bytes"
    files = [RealRunFile("someone__repo", "a" * 40, "logs/run 1/events.out.tfevents.1.h", blob_id(good), len(good)),
             RealRunFile("someone__repo", "a" * 40, "logs/hparams.yaml", blob_id(bad), len(bad))]
    base = _mirror(tmp_path / "mirror", files, {files[0].path: good, files[1].path: b"tampered bytes!!"})
    dest = tmp_path / "dest"
    problems = fetch(str(dest), base, files)
    assert len(problems) == 1 and "logs/hparams.yaml" in problems[0] and "not written" in problems[0]
    assert Path(local_path(str(dest), files[0])).read_bytes() == good
    assert not Path(local_path(str(dest), files[1])).exists()
    assert missing(str(dest), files) == [files[1]]


def test_the_manifest_fetches_the_real_files_byte_for_byte(tmp_path, realruns):
    """Every pinned file, served from a mirror of the real ones, is fetched and verified into an empty directory."""
    mirror = tmp_path / "mirror"
    for f in MANIFEST:
        owner, name = f.repo.split("__", 1)
        target = mirror / owner / name / f.commit / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path(str(realruns), f), target)
    dest = tmp_path / "dest"
    assert main(["--dest", str(dest), "--base-url", mirror.as_uri()]) == 0
    assert missing(str(dest)) == []
    assert main(["--dest", str(dest), "--base-url", (tmp_path / "nowhere").as_uri()]) == 0  # nothing left to fetch
