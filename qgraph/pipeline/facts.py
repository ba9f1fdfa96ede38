"""The facts passes require, produce and report: one name per fact, each with what it means.

A pass declares the facts it ``requires`` and ``produces``; the manager refuses
an order in which a requirement is not produced earlier. A pass may also report
a fact it established at run time (``PassResult.facts``), which later stages
read instead of looking for op names.
"""

from __future__ import annotations

#: A prompt chunk of several tokens was rewritten to GroupQueryAttention (fuse-decode-attention): the graph
#: takes the runtime's chunks only (in each row, consecutive positions from the chunk's first token, -1 only
#: after them, and the first position + seq_len <= ctx_len).
PREFILL_CHUNKS_CONSECUTIVE = "prefill_chunks_consecutive"
