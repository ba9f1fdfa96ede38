"""``qgraph bench``: decode speed against Hugging Face, plain ONNX Runtime and the memory bound.

On the same weights and in one run it measures:

* Hugging Face PyTorch eager (a prefill, then one forward per token with its cache);
* ONNX Runtime on the plain (raw) export, the presents fed back as numpy arrays;
* qgraph's compiled ``cpu`` artifact (the retained-state runtime);
* onnxruntime-genai for the Llama-family models its builder takes (:mod:`.genai`: its builder's graph, its own
  generation loop, greedy, the bench's threads, no early stop);
* with ``quantize`` (int4, int8) also qgraph's quantized ``cpu`` artifact, ONNX Runtime's MatMulNBits path on the
  plain export (:mod:`.ort_quant`: Gemm -> MatMul and transposed weights first, so that every linear layer is
  quantized) and onnxruntime-genai at that precision, against the bound for the bytes a quantized step reads (every
  weight product as blockwise integers with an fp32 scale per block, the rest as in fp32);
* the memory-bandwidth bound: the best rate of a [1, K] x [K, N] fp32 product over
  512 MiB, which turns the model's weight bytes into a floor on the time per token;
* the kernel ceiling: the compiled decode graph's weight products (every MatMul
  and Gemm with a 2-D weight, in graph order, same shapes and layout) alone in one
  ONNX Runtime session with the runtime's settings, and nothing else: no
  attention, norms or cache. No ONNX Runtime CPU graph of this model can decode
  faster than its own products run, so this separates what the graph costs from
  what ONNX Runtime's kernels cost at these shapes.

Each contender runs ``rounds`` times, interleaved, and the median is reported, so
a noisy neighbour on a shared machine hurts all of them alike.

The bound of the table is the best rate seen in any round, while contenders
are medians; on a machine whose bandwidth swings by a quarter from minute to
minute, that compares qgraph's typical minute with the machine's best one. So
the bound is also measured *in time* with qgraph: one decode step, one run of
the products alone and one run of the bound's product, taken in turn (each
alternation within about 60 ms), their ratios taken within each alternation.
That product runs in ONNX Runtime with the runtime's settings; where numpy
streamed it faster in the rounds, the paired bound is scaled up by that factor.
The time to first token, one sample per round, is paired the same way: qgraph's
and plain ONNX Runtime's prefills taken in turn, 40 times.

The parts: :mod:`.report` (the report, its table and the targets),
:mod:`.bound` (the bandwidth bound and the products-only kernel ceiling),
:mod:`.timing` (sides taken in turn), :mod:`.contenders` (the timed loops of
Hugging Face and plain ONNX Runtime, the weight bytes a step streams),
:mod:`.genai`, :mod:`.ort_quant` and :mod:`.run` (the driver).
"""

from __future__ import annotations

from qgraph.devtools.bench.bound import bandwidth_by_engine, measure_bandwidth, write_products_only
from qgraph.devtools.bench.report import TARGETS, BenchReport, Result, save_plot, write_json
from qgraph.devtools.bench.run import run_bench
from qgraph.devtools.bench.timing import PAIRS, TTFT_PAIRS, TTFT_PAUSE_S, in_turn, timed

__all__ = [
    "PAIRS",
    "TARGETS",
    "TTFT_PAIRS",
    "TTFT_PAUSE_S",
    "BenchReport",
    "Result",
    "bandwidth_by_engine",
    "in_turn",
    "measure_bandwidth",
    "run_bench",
    "save_plot",
    "timed",
    "write_json",
    "write_products_only",
]
