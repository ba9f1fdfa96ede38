"""tools/speculation_estimate.py: the prompt-lookup replay that PERFORMANCE.md quotes counts passes correctly.

The tool's timings are only printed; what is checked here is the count of
passes a prompt-lookup decoder needs for a given greedy text, which turns
those timings into the estimate.
"""

from __future__ import annotations

import pytest
from helpers import load_tool


@pytest.fixture(scope="module")
def spec():
    return load_tool("speculation_estimate")


def test_draft_copies_after_the_longest_earlier_ngram(spec):
    # [7, 5, 6] never came before; [5, 6] did, at 0: what followed it is drafted, running into the draft itself
    assert spec.lookup_draft([5, 6, 7, 5, 6], 3) == [7, 5, 6]
    assert spec.lookup_draft([5, 6, 7, 5, 6], 5) == [7, 5, 6, 7, 5]
    # the last earlier occurrence wins: [4] came at 0 (then 1) and at 2 (then 9)
    assert spec.lookup_draft([4, 1, 4, 9, 4], 1) == [9]
    # a run of one token drafts more of it
    assert spec.lookup_draft([3, 9, 9, 9], 4) == [9, 9, 9, 9]
    # nothing seen before: no draft
    assert spec.lookup_draft([1, 2, 3], 4) == []
    assert spec.lookup_draft([], 4) == []


def test_passes_count_kept_drafts_plus_the_models_own_token(spec):
    # no repetition: one token per pass, whatever k
    assert spec.lookup_passes([1, 2, 3], [10, 11, 12, 13], 3) == 4
    # [1, 2, 3] then the same again: pass 1 gives 1 (no draft); pass 2 drafts [2, 3, 1] after [1], all kept,
    # plus the model's own token (2): 4 tokens; pass 3 gives the last one (3)
    assert spec.lookup_passes([1, 2, 3], [1, 2, 3, 1, 2, 3], 3) == 3
    # k = 0 is plain decoding
    assert spec.lookup_passes([1, 2, 3], [1, 2, 3, 1, 2, 3], 0) == 6
    # a draft that is wrong from its first token costs nothing but gains nothing
    assert spec.lookup_passes([7, 8, 7], [5, 6], 2) == 2
    assert spec.lookup_passes([7], [], 3) == 0
