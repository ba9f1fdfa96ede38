"""Fuzz every pass: on random graphs holding its pattern (perturbed or not), a pass declines
(graph unchanged), refuses with a typed error, or rewrites to a graph that passes the ONNX
checker and computes the same outputs (see tests/fuzz/, one strategy module per pass).

CI runs :data:`EXAMPLES` derandomized examples per pass (the same ones every run);
``tools/fuzz_passes.py --examples N`` runs long campaigns with other seeds.
"""

from __future__ import annotations

import collections
import logging

import pytest
from fuzz import STRATEGIES, Case, check
from hypothesis import HealthCheck, given, settings

#: Examples per pass in CI.
EXAMPLES = 100
#: Passes whose strategy must produce at least this many rewrites in CI (else the fuzz tests nothing).
MIN_REWRITES = 10


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_pass_declines_or_rewrites_correctly(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # declines and shape-inference warnings are expected here
    counts: collections.Counter[str] = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])  # fmt: skip
    @given(case=STRATEGIES[name])
    def run(case: Case) -> None:
        counts[check(case).kind] += 1

    run()
    print(f"{name}: {dict(counts)}")
    assert sum(counts.values()) >= EXAMPLES // 2, counts
    assert counts["rewrite"] >= MIN_REWRITES, (
        f"{name}: only {counts['rewrite']} rewrites in {dict(counts)}; the strategy misses the pattern"
    )
