"""Download the third-party event files the test suite reads (``shared/realruns``) from their public repositories.

They are real TensorBoard logs that other people's training jobs wrote (PyTorch Lightning, Keras, YOLOv5, the Hugging
Face Trainer, a PPO script, the TensorFlow NMT tutorial). Most of their repositories carry no licence, so they are not
part of this one: this script fetches each file at its pinned commit and checks its git blob id, so the bytes are
exactly the ones the tests were written against. It needs internet access; the tests skip when the files are absent.

    python scripts/fetch_realruns.py                  # into shared/realruns/ of this checkout
    python scripts/fetch_realruns.py --dest DIR       # elsewhere (then set TB_GRADIENT_REALRUNS=DIR)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(REPO, "shared", "realruns")
#: where a file of ``owner/name`` at ``commit`` is served; ``--base-url`` points it at a mirror
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"


class RealRunFile(NamedTuple):
    repo: str  # "owner__name": the directory it goes into
    commit: str
    path: str  # inside the repository (and inside ``repo/`` locally)
    blob: str  # git blob id of the exact bytes
    size: int


MANIFEST: tuple[RealRunFile, ...] = tuple(RealRunFile(*row) for row in (
    ("AnAccountWithoutAName__Deep-Lineary-Gated-Networks", "f5ad0fcb510dbae9b4235610ab4705584de90fe2",
     "lightning_logs/version_0/events.out.tfevents.1765349942.Kosu.8360.0",
     "8c24a9f3fc9fa70a841a9561f4b494ee2c5e20f8", 1935),
    ("AnAccountWithoutAName__Deep-Lineary-Gated-Networks", "f5ad0fcb510dbae9b4235610ab4705584de90fe2",
     "lightning_logs/version_0/hparams.yaml",
     "f2cc88a47a2e728a674efabbc6a11576f993e96f", 62),
    ("Aydana1__Enhancing_YOLOv5l", "794be0cf42a4dad4f32e502888281e2fa53678a7",
     "runs/train/exp31/events.out.tfevents.1650311940.ws-l3-004.2542207.0",
     "615270dabb8db900527844be846de9c99d2a5bd4", 547331),
    ("Aydana1__Enhancing_YOLOv5l", "794be0cf42a4dad4f32e502888281e2fa53678a7",
     "runs/train/yolov5m6_34/events.out.tfevents.1650811880.ws-l3-010.3858421.0",
     "ef1047fe0c1fc3b6f83ea54d41e16761bb13aeda", 1480499),
    ("TheCodeheadMT__TensorBoard-Tutorial", "330ae88e9f65c05081fd2bb0d75ed18a8a7f9f00",
     "archive/logs/mod1-reuters-1690485395/train/"
     "events.out.tfevents.1690485396.e-bnbobg-5l77j-0.80091.3.v2",
     "d3a6493e738795a22bcc409f6c77d7f8f37f6618", 148129),
    ("TheCodeheadMT__TensorBoard-Tutorial", "330ae88e9f65c05081fd2bb0d75ed18a8a7f9f00",
     "archive/logs/mod1-reuters-1690485395/validation/"
     "events.out.tfevents.1690485399.e-bnbobg-5l77j-0.80091.4.v2",
     "a0b4257491479c042fac8bd42c1acaf8773b5783", 6460),
    ("ZakSingh__omelette", "cd5dd2a4b78fa5ba6c5360ba5a429c5f8564f705",
     "ppo_logs/egraph-v0__PropLang_3__1__1655386763/events.out.tfevents.1655386764.ip-172-31-28-224.7753.0",
     "999b56d6baa438db6a442ccc5cdee08f338d96c1", 1644130),
    ("ZakSingh__omelette", "e1c11ee73a68a3ad828298fcb2479438e463ff9a",
     "lightning_logs/math/events.out.tfevents.1654496660.ip-172-31-28-224.8082.0",
     "ce839b390e90cee89b03fbfa9b3f52b4161ee13b", 256407),
    ("ZakSingh__omelette", "e1c11ee73a68a3ad828298fcb2479438e463ff9a",
     "lightning_logs/math/hparams.yaml",
     "0967ef424bce6791893e9a57bb952f80fd536e93", 3),
    ("aarugunj27__EnzymeKcatAnaylsis", "70858ba08a57bcbcfbae5a231f53ce3e3ccc6704",
     "logs/events.out.tfevents.1735065686.DESKTOP-FMNF4GC.26468.0",
     "efb51e10d40bb669d94fcfad3c12b8cb45703282", 7142),
    ("dparra2399__LearnedCoWSiP", "043f361c4d066b393150924b24ff5981ae9dd59c",
     "experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000/"
     "events.out.tfevents.1741624763.nova-2.biostat.wisc.edu.15750.0",
     "5836b071b014d401a40ab9341b3c9bb3378a7603", 1058858),
    ("dparra2399__LearnedCoWSiP", "043f361c4d066b393150924b24ff5981ae9dd59c",
     "experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000/hparams.yaml",
     "4acd18e2620a88d1d41f169622b2dc723b74d12f", 451),
    ("dparra2399__LearnedCoWSiP", "043f361c4d066b393150924b24ff5981ae9dd59c",
     "experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000_fourier/"
     "events.out.tfevents.1741552356.nova-2.biostat.wisc.edu.37772.0",
     "4d4489f2d050832f0bdf9ad13790f8f12009cecf", 89712),
    ("dparra2399__LearnedCoWSiP", "043f361c4d066b393150924b24ff5981ae9dd59c",
     "experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000_fourier/hparams.yaml",
     "fbd7244433f58fd9c89fd29c423f30af6a032645", 478),
    ("dparra2399__LearnedCoWSiP", "27e0f550a1993b638e8d2bd5588f96abf3af1e7d",
     "experiments/illum_models/n1024_k8_sigma10_photonstarved/"
     "events.out.tfevents.1744056523.nova-2.biostat.wisc.edu.4108708.0",
     "e7894218f6911d2cf1cff415072f5b1481366f7b", 1399532),
    ("dparra2399__LearnedCoWSiP", "27e0f550a1993b638e8d2bd5588f96abf3af1e7d",
     "experiments/illum_models/n1024_k8_sigma10_photonstarved/hparams.yaml",
     "303f6ab9663c3f91d34613fdd259662fca552aaa", 628),
    ("dparra2399__LearnedCoWSiP", "df68f40ceb94bdea9be57be6a8877e01039852f3",
     "experiments/illum_models/n2400_k8_sigma80/"
     "events.out.tfevents.1741210671.nova-2.biostat.wisc.edu.10796.0",
     "10c2f39cf3a79049b69d997da202893296f0969f", 1130085),
    ("dparra2399__LearnedCoWSiP", "df68f40ceb94bdea9be57be6a8877e01039852f3",
     "experiments/illum_models/n2400_k8_sigma80/hparams.yaml",
     "6cfe0280824ce6f37c0a04a9f450e5e3ac9a203a", 503),
    ("iamlockelightning__NMT", "e490ce11d034349be558b53e0bd84bc62f22538f",
     "nmt/nmt_model/train_log/events.out.tfevents.1513841642.keg33",
     "52cf34ac99b71f487769520b2c3086aec10cb8cf", 3033868),
    ("inwaves__prob-models", "c4148566c35a3e80b50ec10e0c63343da5d88704",
     "lightning_logs/version_82/events.out.tfevents.1642800190.Apollo-Prime.local.21260.0",
     "76b2ab93ba1efa58189932372264984dba3cf15d", 47546),
    ("inwaves__prob-models", "c4148566c35a3e80b50ec10e0c63343da5d88704",
     "lightning_logs/version_82/hparams.yaml",
     "32414d358232a9f45b48910e62ba2eb662bc78e8", 119),
    ("pishoyg__english-to-arabic-machine-translation", "ef90d822f4ff5620d3c66270bff462f145590251",
     "eng-40000_ara-40000_2x128-lstm_sgd-1.0-10000000_EN-bi_DO-0.2_beam_search-10_AT-normed_bahdanau_SW-bpe/"
     "train_log/events.out.tfevents.1549816083.cse-p07-2166U03",
     "bb9654100325e633ac539687e4c7b9fe08883592", 2704379),
    ("trungnh30__tmp", "cc8bb1209a88fdf08ef6a51caaf6eb3ca0d5b9db",
     "nmt_model/train_log/events.out.tfevents.1547626707.9e8d19ba094a",
     "76e40a61b8f99d41ca4cbe719f2ebd9b1f423740", 2955121),
    ("zhangpengGenedock__Translator", "389447d320c5b9517e5b5dbaa970c022c289a8da",
     "model/train_log/events.out.tfevents.1505822345.localhost",
     "e2932b55a45fb7b836c6ae687463b70b145c6fb1", 1968063),
))


def blob_id(data: bytes) -> str:
    """Git's id of a blob with these bytes (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def local_path(root: str, f: RealRunFile) -> str:
    return os.path.join(root, f.repo, *f.path.split("/"))


def _intact(path: str, f: RealRunFile) -> bool:
    if not os.path.isfile(path) or os.path.getsize(path) != f.size:
        return False
    with open(path, "rb") as fh:
        return blob_id(fh.read()) == f.blob


def missing(root: str, files: Iterable[RealRunFile] = MANIFEST) -> list[RealRunFile]:
    """The files of ``files`` that are not under ``root`` with their pinned bytes."""
    return [f for f in files if not _intact(local_path(root, f), f)]


def url_of(f: RealRunFile, base_url: str = DEFAULT_BASE_URL) -> str:
    owner, name = f.repo.split("__", 1)
    return "/".join((base_url.rstrip("/"), owner, name, f.commit, urllib.parse.quote(f.path)))


def fetch(dest: str, base_url: str = DEFAULT_BASE_URL, files: Iterable[RealRunFile] = MANIFEST,
          timeout: float = 60.0) -> list[str]:
    """Download every file of ``files`` missing under ``dest``; verify its blob id before it is written.

    Returns one line per problem (empty when every file is in place): a file whose bytes differ is not written.
    """
    problems = []
    for f in missing(dest, files):
        url = url_of(f, base_url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https or a mirror
                data = response.read()
        except OSError as e:
            problems.append(f"{f.repo}/{f.path}: download failed ({e})")
            continue
        if blob_id(data) != f.blob:
            problems.append(f"{f.repo}/{f.path}: blob {blob_id(data)} is not the pinned {f.blob}; not written")
            continue
        target = local_path(dest, f)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".part"
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=DEFAULT_DEST, help="directory to fill (default: shared/realruns here)")
    ap.add_argument("--base-url", default=DEFAULT_BASE_URL,
                    help="serves <owner>/<name>/<commit>/<path> (default: GitHub's raw file host)")
    args = ap.parse_args(argv)
    todo = missing(args.dest)
    print(f"{len(MANIFEST) - len(todo)} of {len(MANIFEST)} files already in {args.dest}; fetching {len(todo)}")
    problems = fetch(args.dest, args.base_url)
    for line in problems:
        print(f"fetch_realruns: {line}", file=sys.stderr)
    if not problems:
        print(f"all {len(MANIFEST)} files verified in {args.dest}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
