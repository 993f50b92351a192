"""The offline auditor (``tb-gradient`` console script)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("tb-gradient: the auditor is not built yet", file=sys.stderr)
    return 2
