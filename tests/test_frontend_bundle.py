"""The committed bundle under ``tb_gradient_plugin/static/`` is exactly what ``frontend/`` builds.

TensorBoard serves the committed files, so a source change without a rebuild (or a hand edit of the bundle) would
ship a tab that differs from its sources. The build is pinned by ``package-lock.json`` and reproducible byte for byte.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONTEND = REPO / "frontend"
STATIC = REPO / "tb_gradient_plugin" / "static"
#: The tab's code plus the parts of ECharts it uses; a whole-library import would be about twice this.
MAX_BUNDLE_BYTES = 1_000_000


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed to build the frontend (Node.js 18 or newer)"
    return path


def _build(outdir: Path) -> dict[str, bytes]:
    if not (FRONTEND / "node_modules").is_dir():
        subprocess.run([_tool("npm"), "ci", "--no-audit", "--no-fund"], cwd=FRONTEND, check=True, timeout=600)
    subprocess.run([_tool("node"), "build.mjs", "--outdir", str(outdir)], cwd=FRONTEND, check=True, timeout=300)
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.rglob("*")) if p.is_file()}


def test_committed_bundle_matches_a_fresh_build(tmp_path: Path) -> None:
    built = _build(tmp_path / "static")
    assert "index.js" in built
    committed = {name: (STATIC / name).read_bytes() for name in built if (STATIC / name).is_file()}
    stale = [name for name in built if committed.get(name) != built[name]]
    assert not stale, f"tb_gradient_plugin/static/ is out of date for {stale}: run `npm run build` in frontend/"
    extra = sorted(p.name for p in STATIC.glob("*.js") if p.name not in built)
    assert not extra, f"files in tb_gradient_plugin/static/ that the build does not produce: {extra}"


def test_bundle_is_a_module_exporting_render_and_stays_small() -> None:
    bundle = (STATIC / "index.js").read_bytes()
    assert len(bundle) < MAX_BUNDLE_BYTES, f"index.js is {len(bundle):,} bytes"
    text = bundle.decode("utf-8")
    assert "as render}" in text or "render}" in text.rsplit("export", 1)[-1]


def test_sources_never_build_html_from_strings() -> None:
    """Layer and run names come from users' models and paths: the tab sets them as text, never parses them as HTML."""
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser", "createContextualFragment")
    found = [f"{path.name}: {sink}" for path in sorted((FRONTEND / "src").glob("*.js"))
             for sink in sinks if sink in path.read_text(encoding="utf-8")]
    assert not found, f"HTML sinks in the frontend sources: {found}"
