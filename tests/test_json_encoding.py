"""The routes' JSON encoder: strict JSON (a browser's JSON.parse accepts it) straight from numpy arrays."""

from __future__ import annotations

import json

import numpy as np

from tb_gradient_plugin.json_encoding import to_json


def _strict(body: bytes):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(body, parse_constant=refuse)


def test_non_finite_numbers_become_null_and_arrays_keep_their_shape():
    doc = {"m": np.array([[1.5, np.nan], [-np.inf, 1e-30]], dtype=np.float32), "f": float("inf"),
           "i": np.arange(3, dtype=np.int64), "b": np.array([True, False]), "s": np.float64(2.0), "n": None}
    assert _strict(to_json(doc)) == {"m": [[1.5, None], [None, 1e-30]], "f": None, "i": [0, 1, 2], "b": [1, 0],
                                     "s": 2.0, "n": None}


def test_names_stay_inert_and_ascii():
    """Values and keys alike: a validation metric's key is the user's tag name."""
    doc = {"layers": ["<img onerror=x>", "ünï & <b>"], "val_metrics": {"val/<script>&": [1.0]}}
    body = to_json(doc)
    assert body.isascii() and b"<" not in body and b">" not in body and b"&" not in body
    assert _strict(body) == doc
