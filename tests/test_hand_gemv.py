"""tools/hand_gemv.py: the hand-written kernel that PERFORMANCE.md times against ONNX Runtime computes the products.

Its speed is only printed (by the tool); what is checked is that the figure
compares like with like: every product, padded panels included, equals
numpy's and ONNX Runtime's, and each instance keeps its own weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool

if shutil.which("gcc") is None:  # the tool compiles its kernel; without a compiler there is nothing to test
    pytest.skip("tools/hand_gemv.py needs gcc", allow_module_level=True)


@pytest.fixture(scope="module")
def hand_gemv():
    return load_tool("hand_gemv")


def test_kernel_matches_numpy_and_onnx_runtime(hand_gemv, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Widths that are and are not multiples of the 64-column panel; two depths, as GPT-2's layers.
    weights = [rng.standard_normal(s, dtype=np.float32) for s in [(8, 70), (70, 64), (8, 1), (70, 130)]]
    x = rng.standard_normal(70, dtype=np.float32)
    hand = hand_gemv.HandGemv(weights, 2, tmp_path)
    got = hand.run(x)
    assert [g.shape for g in got] == [(70,), (64,), (1,), (130,)]
    for g, w in zip(got, weights):
        np.testing.assert_allclose(g, x[: w.shape[0]] @ w, rtol=1e-5, atol=1e-5)
    # A second instance has its own products; the first still computes its own.
    other = hand_gemv.HandGemv([weights[1]], 1, tmp_path)
    np.testing.assert_allclose(other.run(x)[0], x @ weights[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hand.run(x)[3], x @ weights[3], rtol=1e-5, atol=1e-5)
    # The ONNX Runtime side runs the same products (the large one fed, as the cpu target's runtime does).
    sess, feeds = hand_gemv.ort_products(weights, 1, tmp_path, feed_min_bytes=70 * 130 * 4)
    assert set(feeds) == {"x8", "x70", "w3"}
    feeds = {**feeds, "x8": x[None, :8], "x70": x[None]}
    for g, (y,) in zip(hand.run(x), sess.run(None, feeds)):
        np.testing.assert_allclose(g, y, rtol=1e-5, atol=1e-5)
    hand.close()
    other.close()
