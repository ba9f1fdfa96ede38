"""Sampling: what temperature, top_k and top_p pick, against the exact distribution, and the values refused.

The exact distribution is written out here for small logits, and compared
with Hugging Face's logits warpers (the order they run in: temperature, top_k,
top_p); the sampled frequencies are then checked against it with a bound of
five standard deviations per token (seeded, so the draw is the same every run).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qgraph.runtime.sampling import GenerationError, Sampling, choose, distribution

LOGITS = np.array([3.0, 2.0, 1.0, 0.0, -1.0], np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _on(kept: list[int], z: np.ndarray) -> np.ndarray:
    """softmax over the ``kept`` tokens only, zero elsewhere."""
    p = np.zeros(len(z))
    p[kept] = _softmax(z[kept])
    return p


Z = LOGITS.astype(np.float64)
# softmax(LOGITS) = [0.636, 0.234, 0.086, 0.032, 0.012]: the cumulative mass before each token is 0, 0.636, 0.870, 0.956, 0.988.
EXACT = {
    "temperature 1": (Sampling(temperature=1.0), _softmax(Z)),
    "temperature 0.5 sharpens": (Sampling(temperature=0.5), _softmax(Z / 0.5)),
    "temperature 2 flattens": (Sampling(temperature=2.0), _softmax(Z / 2)),
    "top_k 2": (Sampling(temperature=1.0, top_k=2), _on([0, 1], Z)),
    "top_k 1 is greedy": (Sampling(temperature=1.0, top_k=1), _on([0], Z)),
    "top_k over the vocabulary keeps all (clamped)": (Sampling(temperature=1.0, top_k=1000), _softmax(Z)),
    # 0.636 < 0.8 keeps the second token; 0.870 >= 0.8 drops the third: the smallest set whose mass reaches 0.8.
    "top_p 0.8": (Sampling(temperature=1.0, top_p=0.8), _on([0, 1], Z)),
    "top_p 0.9": (Sampling(temperature=1.0, top_p=0.9), _on([0, 1, 2], Z)),
    "top_p 0.5 keeps the top token": (Sampling(temperature=1.0, top_p=0.5), _on([0], Z)),
    # top_k first: over [3, 2, 1] the mass before the third is 0.665 + 0.245 = 0.910 >= 0.9, so top_p then keeps two.
    "top_k 3 then top_p 0.9": (Sampling(temperature=1.0, top_k=3, top_p=0.9), _on([0, 1], Z)),
    # temperature first: at 2 the softmax is [0.429, 0.260, 0.158, 0.096, 0.058]; the mass before the fifth is 0.942 >= 0.9.
    "temperature 2 then top_p 0.9": (Sampling(temperature=2.0, top_p=0.9), _on([0, 1, 2, 3], Z / 2)),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_distribution_is_the_exact_one(case: str) -> None:
    sampling, want = EXACT[case]
    np.testing.assert_allclose(distribution(LOGITS, sampling), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.85), (60, 0.95)])
def test_distribution_is_hugging_faces(temperature: float, top_k: int, top_p: float) -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(3).standard_normal(50) * 3
    scores = torch.tensor(logits[None], dtype=torch.float64)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for w in warpers:
        scores = w(torch.zeros((1, 1), dtype=torch.long), scores)
    want = torch.softmax(scores, dim=-1)[0].numpy()
    got = distribution(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert ((got > 0) == (want > 0)).all()  # the same tokens kept


@pytest.mark.parametrize("case", ["temperature 1", "temperature 2 flattens", "top_k 2", "top_p 0.9", "temperature 2 then top_p 0.9"])
def test_choose_draws_from_the_distribution(case: str) -> None:
    sampling, p = EXACT[case]
    n = 20_000
    rng = np.random.default_rng(11)
    counts = np.bincount([choose(LOGITS, sampling, rng) for _ in range(n)], minlength=len(p))
    for tok, (c, q) in enumerate(zip(counts, p)):
        if q == 0:
            assert c == 0, f"{case}: token {tok} has probability 0 but was drawn {c} times"
        else:
            sigma = math.sqrt(q * (1 - q) / n)
            assert abs(c / n - q) <= 5 * sigma + 1e-12, f"{case}: token {tok} drawn {c / n:.4f} of the time, expected {q:.4f}"


def test_greedy_takes_the_argmax_and_ignores_the_filters() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([0.1, 5.0, 4.9, -2.0], np.float32)
    assert choose(logits, Sampling(), rng) == 1
    assert choose(logits, Sampling(top_k=3, top_p=0.2), rng) == 1


def test_top_k_over_the_vocabulary_is_clamped() -> None:
    """HF clamps top_k to the vocabulary: a larger one keeps every token (it used to raise numpy's ValueError)."""
    a = [choose(LOGITS, Sampling(temperature=1.0, top_k=10_000), np.random.default_rng(4)) for _ in range(3)]
    b = [choose(LOGITS, Sampling(temperature=1.0), np.random.default_rng(4)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=float("nan")), r"temperature must be >= 0 and finite \(0 is greedy\), got nan"),
        (dict(temperature=float("inf")), r"temperature must be >= 0 and finite \(0 is greedy\), got inf"),
        (dict(temperature=-1.0), r"temperature must be >= 0 and finite \(0 is greedy\), got -1.0"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1; leave it out"),
        (dict(temperature="0.7"), r"temperature must be >= 0 and finite \(0 is greedy\), got '0.7'"),
        (dict(top_p="0.5"), r"top_p must be in \(0, 1\], got '0.5'"),
    ],
)
def test_bad_sampling_values_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(GenerationError, match=match):
        Sampling(**kwargs).check()  # type: ignore[arg-type]


def test_a_tiny_temperature_is_greedy_among_the_tied_best() -> None:
    """logits / 1e-320 overflow to inf, and inf - inf made the distribution NaN (numpy's 'Probabilities contain NaN');
    the largest logit is taken out first, so the mass goes to the best tokens, shared among ties."""
    logits = np.array([1.0, 3.0, 2.0, 3.0], np.float32)
    for temperature in (1e-320, 1e-30):
        p = distribution(logits, Sampling(temperature=temperature))
        np.testing.assert_array_equal(p, [0, 0.5, 0, 0.5])
        assert choose(logits, Sampling(temperature=temperature), np.random.default_rng(0)) in (1, 3)
