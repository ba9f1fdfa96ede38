"""Weight-only quantization: every linear layer, the vocabulary projection and the token embedding in int8 or int4 blocks.

    # y = x @ W (+ b)      ->  MatMulNBits(x, Q(W), scales (, bias))          W[k, n] ~ scale[n, k // bs] * (q[n, k] - zp)
    # e = E[ids]           ->  GatherBlockQuantized(Q(E), ids, scales)         the same blocks along each row of E
    # logits = h @ E^T     ->  MatMulNBits(h, Q(E^T), ...)                     the vocabulary: vocab_mode's bits (int8)

A decode step reads every weight once, so its time is bytes over memory
bandwidth: int8 blocks read about 0.28x an fp32 weight's bytes, int4 blocks
about 0.16x (block 32, one fp32 scale per block). The pass decides what to
quantize and rewrites the graph; the numbers come from ONNX Runtime's own block
quantizer (``onnxruntime.quantization``'s ``DefaultWeightOnlyQuantizer``,
round to nearest, C++ kernels), whose layout its ``MatMulNBits`` kernel reads.

What it rewrites (fp32 constant weights only):

* ``MatMul(x, W)``: W a 2-D constant [K, N], or ``Transpose(E)`` of a 2-D
  constant (dynamo's tied vocabulary projection of a large model);
* ``Gemm(a, B, C)`` with transA = 0 (both exporters write GPT-2's linear
  layers so): B or B^T the weight, alpha folded into it, beta * C a bias input
  of ``MatMulNBits`` when it is a constant row, else an ``Add``;
* ``Gather(E, ids)`` over the token embedding (indices from ``input_ids``):
  ``com.microsoft.GatherBlockQuantized``, whose uint8 layout is MatMulNBits'
  (default zero point 8 or 128), so a projection tied to E (E^T as a weight,
  through a Transpose or as an equal copy) shares its quantized data and
  scales; an artifact stores the shared bytes once (weights are stored once by
  content).

The vocabulary (the projection to the logits, found as the weight product whose
output reaches a graph output through shape-only ops, and the token embedding)
takes its own mode, ``vocab_mode``: int8 under int8, ``int4-rescore`` under
int4. Plain int4 there costs most of int4's teacher-forced top-1 agreement with
fp32 (tiny-gpt2: 92.8% against 98.1% in int8; tiny-llama: 93.1% and 96.2%), and
no int4 scheme tried (clip search, asymmetric, HQQ, block 16) brought it past
94.5% (docs/quantization.md). ``int4-rescore`` keeps int4's bytes and int8's
accuracy: the int4 logits pick each token's RESCORE_K candidates, which are
recomputed from int8 rows (``_rescore``); since those int4 logits only pick,
their blocks are coarser (CANDIDATE_BLOCK: faster, the rest of the tail a
little rougher).

Symmetric blocks by default (no zero points; ``symmetric=False`` writes a zero point per block). ``accuracy_level`` 4 (the
activations rounded to int8 blocks in the kernel) is the fast path on CPU;
level 0 runs int8 weights through a slow path (0.08x, DESIGN.md). A graph that
already holds quantized ops is left alone, and so is a weight that is a graph
input, computed at run time, not float32, or not 2-D: each is a near miss with
its reason. A compile runs it last on each specialization (stages.QUANTIZE: the
passes before it see Gemm and Gather, whose static shapes ONNX inference gives).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from passes.const_values import dtype_and_shape
from passes.constants import MS_DOMAIN, MS_VERSION
from qgraph.ir.graph import Graph, Node, Tensor
from qgraph.ir.validate import is_custom_domain, is_onnx_op
from qgraph.pipeline.fusion import NearMiss
from qgraph.pipeline.manager import Pass, PassResult
from qgraph.pipeline.options import default_quant_vocab

log = logging.getLogger(__name__)

#: The bits of each mode.
BITS = {"int8": 8, "int4": 4}
#: The vocabulary's modes: its projection's bits, and the bits its best candidates are rescored in (None: not rescored).
VOCAB_MODES: dict[str, tuple[int, int | None]] = {"int8": (8, None), "int4": (4, None), "int4-rescore": (4, 8)}
#: Candidates per row that ``int4-rescore`` rescores (the int4 logits' top k).
RESCORE_K = 8
#: The least block size of ``int4-rescore``'s int4 candidate projection (the pass's block size when larger). Its
#: logits only pick the candidates; the chosen ones are recomputed in the pass's own blocks.
CANDIDATE_BLOCK = 128
#: The opset the rescoring's ops take their axes as inputs from (Unsqueeze, ReduceSum).
RESCORE_MIN_OPSET = 13
#: MatMulNBits' accuracy level on CPU: activations in int8 blocks, the fast kernels (level 0 took a slow path for int8).
CPU_ACCURACY_LEVEL = 4
#: Ops that mean a graph is quantized already.
QUANTIZED_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                           "DequantizeLinear", "MatMulBnb4", "MatMulFpQ4"})  # fmt: skip
#: Ops between ``input_ids`` and the token embedding's Gather that keep the ids, and between the vocabulary
#: projection and the graph output it makes.
_ID_PASSTHROUGH = frozenset({"Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def unquantizable(graph: Graph) -> str | None:
    """Why weight-only quantization cannot act on ``graph`` at all (None: it can): it already holds quantized ops, or
    its linear layers have constant weights and none is float32 (a float16 export). The pass would decline every
    site; a command that asked for ``--quantize`` says so instead of writing an unquantized artifact labelled as one."""
    quantized = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if quantized:
        return f"the graph is already quantized (it holds {', '.join(quantized)}); use it without --quantize"
    dtypes = {dtype_and_shape(graph, n.inputs[1])[0] for n in graph.nodes
              if is_onnx_op(n, "MatMul", "Gemm") and len(n.inputs) > 1 and graph.is_constant(n.inputs[1])}  # fmt: skip
    if dtypes and np.dtype(np.float32) not in dtypes:
        return (f"its linear layers' weights are {', '.join(sorted(d.name for d in dtypes))}; weight-only quantization "
                "takes a float32 model (export it in float32: drop --dtype float16)")  # fmt: skip
    return None


def candidate_block_size(k: int, block_size: int) -> int:
    """The block size of a rescored vocabulary's int4 candidate projection over K = ``k`` inputs: CANDIDATE_BLOCK, halved
    until it divides K, never finer than ``block_size``, the pass's own (coarser blocks run faster; the candidates they
    pick are recomputed in the pass's blocks)."""
    size = max(block_size, CANDIDATE_BLOCK)
    while size > block_size and k % size:
        size //= 2
    return size


@dataclass
class Blocks:
    """A weight W [K, N] in blocks along K: ``data`` [N, K_blocks, blob] (uint8), ``scales`` [N, K_blocks]."""

    data: Tensor
    scales: Tensor
    #: Asymmetric blocks' zero points [N, packed K_blocks] (uint8), None for symmetric ones (the kernels' default 8 or 128).
    zero_points: Tensor | None
    k: int
    n: int
    #: The constant W was read from, and whether W is its transpose (then a tied embedding may be that constant).
    source: Tensor
    transposed: bool
    #: The factor W was scaled by (a Gemm's alpha); only unscaled blocks can serve an embedding.
    alpha: float = 1.0
    #: Bits per weight (4 or 8).
    bits: int = 4
    #: Weights per block along K.
    block_size: int = 32
    #: ``data`` as GatherBlockQuantized reads it, [N, K * bits / 8] (the same bytes), once made.
    rows: Tensor | None = None

    def gather_data(self, graph: Graph, prefix: str) -> Tensor:
        """``data`` as GatherBlockQuantized reads it (one tensor for every gather of these blocks)."""
        if self.rows is None:
            self.rows = graph.constant(prefix, np.asarray(graph.const_value(self.data)).reshape(self.n, -1))
        return self.rows


@dataclass
class _Run:
    stats: dict[str, int] = field(default_factory=dict)
    done: dict[tuple[int, bool, float, int, int], Blocks] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


class QuantizeWeights(Pass):
    """fp32 linear layers, vocabulary projection and token embedding -> int8/int4 blocks (module docstring)."""

    name = "quantize-weights"
    produces = ("weights_quantized",)
    invalidates = ("no_dead_nodes",)
    MODES: ClassVar[tuple[str, ...]] = tuple(BITS)

    def __init__(self, mode: str = "int4", block_size: int = 32, *, vocab_mode: str | None = None,
                 symmetric: bool = True, accuracy_level: int = CPU_ACCURACY_LEVEL) -> None:  # fmt: skip
        if mode not in BITS:
            raise ValueError(f"quantize-weights takes mode {' or '.join(BITS)}, not {mode!r}")
        vocab_mode = default_quant_vocab(mode) if vocab_mode is None else vocab_mode
        if vocab_mode not in VOCAB_MODES:
            raise ValueError(f"quantize-weights takes vocab_mode {', '.join(VOCAB_MODES)}, not {vocab_mode!r}")
        self.mode = mode
        self.bits = BITS[mode]
        self.vocab_mode = vocab_mode
        self.vocab_bits, self.rescore_bits = VOCAB_MODES[vocab_mode]
        # The token embedding reads one row per token: it takes the rescoring's bits (a tied one shares their blocks).
        self.embedding_bits = self.rescore_bits or self.vocab_bits
        self.block_size = block_size
        self.symmetric = symmetric
        self.accuracy_level = accuracy_level
        self.near_misses: list[NearMiss] = []

    # ------------------------------------------------------------------ driver
    def run(self, graph: Graph) -> PassResult:
        self.near_misses = []
        run = _Run()
        linear = [n for n in graph.nodes if is_onnx_op(n, "MatMul", "Gemm")]
        quantized = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
        if quantized:
            for n in linear:
                self._decline(n, f"the graph is already quantized (it holds {', '.join(quantized)})")
            return self._result(graph, run)
        for node in linear:
            why = self._linear(graph, node, run)
            if why is not None:
                self._decline(node, why)
        for node in [n for n in graph.nodes if is_onnx_op(n, "Gather")]:
            why = self._embedding(graph, node, run)
            if why:  # "" is a Gather that is no embedding: not worth a near miss
                self._decline(node, why)
        return self._result(graph, run)

    def _result(self, graph: Graph, run: _Run) -> PassResult:
        stats = run.stats
        if self.near_misses:
            stats["declined"] = len(self.near_misses)
        modified = bool(stats.get("matmul") or stats.get("gemm") or stats.get("embedding"))
        if modified:
            graph.import_domain(MS_DOMAIN, MS_VERSION)
        log.info("%s: %s", self.name, stats or "nothing to quantize")
        return PassResult(graph, modified, stats)

    def _decline(self, node: Node, why: str) -> None:
        self.near_misses.append(NearMiss(node.name, node.op, why))
        log.debug("%s: declined at %s: %s", self.name, node.name, why)

    # ------------------------------------------------------------------ linear layers
    def _linear(self, graph: Graph, node: Node, run: _Run) -> str | None:
        """Rewrite one MatMul or Gemm to MatMulNBits; None when done, else why not."""
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return f"{node.op} has {len(node.inputs)} inputs and {len(node.outputs)} outputs"
        x, w = node.inputs[0], node.inputs[1]
        transposed = False  # True: the weight [K, N] is the transpose of the tensor found
        alpha, bias, bias_tensor = 1.0, None, None
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                return "Gemm transposes its input (transA = 1)"
            transposed = bool(int(node.attrs.get("transB", 0)))
            alpha = float(node.attrs.get("alpha", 1.0))
            beta = float(node.attrs.get("beta", 1.0))
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                c = node.inputs[2]
                if graph.is_constant(c):
                    bias = np.asarray(graph.const_value(c), np.float32) * np.float32(beta)
                elif beta == 1.0:
                    bias_tensor = c
                else:
                    return f"Gemm's C is computed at run time and scaled by beta = {beta}"
        elif x.shape is not None and len(x.shape) < 2:
            return "the MatMul's input is 1-D (a linear layer's input has rows)"
        source = w
        prod = graph.producer(w)
        if prod is not None and is_onnx_op(prod, "Transpose") and not graph.is_constant(w):
            perm = prod.attrs.get("perm")
            if perm is not None and list(perm) != [1, 0]:
                return f"the weight is Transpose(perm={list(perm)}) of a constant, not a 2-D transpose"
            source, transposed = prod.inputs[0], not transposed
        problem = self._weight_problem(graph, source, node)
        if problem is not None:
            return problem
        vocab = self._is_vocab_projection(graph, node)
        rescore = vocab and self.rescore_bits is not None
        why_not = self._rescore_problem(graph, source, transposed, bias, bias_tensor) if rescore else None
        if why_not is not None:  # a projection that cannot be rescored takes the rescoring's bits instead
            log.info("%s: the vocabulary projection %s in int%d, not rescored: %s", self.name, node.name, self.rescore_bits, why_not)
            run.count("rescore_declined")
            rescore = False
        bits = (self.rescore_bits if why_not else self.vocab_bits) if vocab else self.bits
        k = dtype_and_shape(graph, source)[1][1 if transposed else 0]
        block_size = candidate_block_size(k, self.block_size) if rescore else self.block_size
        blocks = self._blocks(graph, source, transposed, alpha, run, bits, block_size)  # type: ignore[arg-type]
        if isinstance(blocks, str):
            return blocks
        fine = self._blocks(graph, source, transposed, alpha, run, self.rescore_bits) if rescore else None  # type: ignore[arg-type]
        if isinstance(fine, str):
            return fine
        out = node.outputs[0]
        coarse = graph.variable(self.name, out.dtype, out.shape) if fine is not None else out
        self._to_matmul_nbits(graph, node, x, blocks, bias, bias_tensor, run, coarse)
        if fine is not None:
            self._rescore(graph, node, x, coarse, out, fine, bias)
            run.count("vocab_rescored")
        run.count(node.op.lower())
        if vocab:
            run.count("vocab_projection")
        return None

    def _rescore_problem(self, graph: Graph, source: Tensor, transposed: bool, bias: np.ndarray | None,
                         bias_tensor: Tensor | None) -> str | None:  # fmt: skip
        """Why the vocabulary projection's candidates cannot be rescored, or None."""
        k = dtype_and_shape(graph, source)[1][1 if transposed else 0]
        if k % self.block_size:  # GatherBlockQuantized's rows would hold the blocks' padding
            return f"its input width {k} is not a multiple of the block size {self.block_size}"
        if bias_tensor is not None:
            return "its bias is computed at run time"
        if bias is not None and bias.ndim > 1 and bias.shape[0] != 1:
            return f"its bias has shape {list(bias.shape)}, not a row"
        opset = graph.opset() or 1
        if opset < RESCORE_MIN_OPSET:
            return f"the graph is at opset {opset}; the rescoring's ops need {RESCORE_MIN_OPSET}"
        return None

    def _rescore(self, graph: Graph, node: Node, x: Tensor, coarse: Tensor, out: Tensor, fine: Blocks,
                 bias: np.ndarray | None) -> None:  # fmt: skip
        """out = coarse logits with the top RESCORE_K of each row recomputed from ``fine`` (more bits) rows.

        # _, idx = TopK(coarse, k)                        idx [..., k]: the candidates
        # rows   = GatherBlockQuantized(fine, idx)        [..., k, K]: their weight columns, dequantized
        # exact  = ReduceSum(rows * x[..., None, :], -1)  (+ bias[idx])
        # out    = ScatterElements(coarse, idx, exact, axis=-1)
        """
        p = self.name
        k = graph.constant(p, np.array([min(RESCORE_K, fine.n)], np.int64))
        idx = graph.variable(p, np.int64)
        graph.add_node("TopK", [coarse, k], [graph.variable(p, out.dtype), idx], {"axis": -1, "largest": 1, "sorted": 0},
                       prefix=p, before=node)  # fmt: skip
        inputs = [fine.gather_data(graph, p), idx, fine.scales] + ([fine.zero_points] if fine.zero_points is not None else [])
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": fine.block_size, "bits": fine.bits}
        rows = graph.add_node("GatherBlockQuantized", inputs, 1, attrs, prefix=p, domain=MS_DOMAIN, before=node).outputs[0]
        last = graph.constant(p, np.array([-1], np.int64))
        col = graph.add_node("Unsqueeze", [x, graph.constant(p, np.array([-2], np.int64))], 1, prefix=p, before=node).outputs[0]
        prod = graph.add_node("Mul", [rows, col], 1, prefix=p, before=node).outputs[0]
        exact = graph.add_node("ReduceSum", [prod, last], 1, {"keepdims": 0}, prefix=p, before=node).outputs[0]
        if bias is not None:
            picked = graph.add_node("Gather", [graph.constant(p, bias.reshape(-1).astype(np.float32)), idx], 1, {"axis": 0},
                                    prefix=p, before=node).outputs[0]  # fmt: skip
            exact = graph.add_node("Add", [exact, picked], 1, prefix=p, before=node).outputs[0]
        graph.add_node("ScatterElements", [coarse, idx, exact], [out], {"axis": -1}, prefix=p, before=node)

    def _weight_problem(self, graph: Graph, w: Tensor, node: Node) -> str | None:
        if any(t is w for t in graph.inputs):
            return f"the weight '{w.name}' is a graph input, not a constant"
        if not graph.is_constant(w):
            prod = graph.producer(w)
            return f"the weight '{w.name}' is computed at run time (by {prod.op if prod else 'nothing'}), not a constant"
        dtype, shape = dtype_and_shape(graph, w)
        if dtype != np.float32:
            return f"the weight '{w.name}' is {dtype.name}; quantize-weights takes float32 weights"
        if len(shape) != 2:
            return f"the weight '{w.name}' has shape {shape}, not 2-D"
        return None

    def _blocks(self, graph: Graph, source: Tensor, transposed: bool, alpha: float, run: _Run, bits: int,
                block_size: int | None = None) -> Blocks | str:  # fmt: skip
        """The ``bits``-bit blocks of W = (source or its transpose) * alpha, made once per weight."""
        block_size = block_size or self.block_size
        key = (id(source), transposed, alpha, bits, block_size)
        if key in run.done:
            return run.done[key]
        values = graph.const_value(source)
        if values is None or values.dtype != np.float32:
            return f"the weight '{source.name}' could not be read as float32"
        w = values.T if transposed else values  # [K, N]
        if alpha != 1.0:
            w = w * np.float32(alpha)
        k, n = (int(d) for d in w.shape)
        data, scales, zero_points = self._quantize(np.ascontiguousarray(w, np.float32), bits, block_size)
        zp = graph.constant(self.name, zero_points) if zero_points is not None else None
        blocks = Blocks(graph.constant(self.name, data), graph.constant(self.name, scales), zp, k, n, source, transposed, alpha, bits,
                        block_size)  # fmt: skip
        run.done[key] = blocks
        run.count("bytes_before", int(values.nbytes))
        run.count("bytes_after", int(data.nbytes + scales.nbytes + (zero_points.nbytes if zero_points is not None else 0)))
        return blocks

    def _quantize(self, w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(data [N, K_blocks, blob] uint8, scales [N, K_blocks] float32, zero points or None when symmetric) of W [K, N]
        in ``bits``-bit blocks, by ONNX Runtime's block quantizer."""
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=self.symmetric, bits=bits)
        data, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
        return data, scales, None if self.symmetric else zero_points

    def _to_matmul_nbits(self, graph: Graph, node: Node, x: Tensor, b: Blocks, bias: np.ndarray | None,
                         bias_tensor: Tensor | None, run: _Run, out: Tensor) -> None:  # fmt: skip
        # out = x @ W + bias; MatMulNBits' bias input is a 1-D [N] row, anything else is added after it.
        # Inputs: A, B, scales, zero_points, g_idx, bias (the optional ones omitted, none trailing).
        inputs: list[Tensor] = [x, b.data, b.scales, b.zero_points if b.zero_points is not None else graph.omitted()]
        add: Tensor | None = bias_tensor
        if bias is not None:
            if bias.shape in ((b.n,), (1, b.n)):  # a bias row; a column [M, 1] or a full [M, N] C is added after
                inputs += [graph.omitted(), graph.constant(self.name, bias.reshape(b.n))]
            else:
                add = graph.constant(self.name, bias)
        while inputs[-1].is_empty():
            inputs.pop()
        attrs = {"K": b.k, "N": b.n, "bits": b.bits, "block_size": b.block_size, "accuracy_level": self.accuracy_level}
        target = graph.variable(self.name, out.dtype, out.shape) if add is not None else out
        graph.remove_nodes([node])  # detached first: ``out`` gets one producer; the new nodes take its place in the order
        graph.add_node("MatMulNBits", inputs, [target], attrs, prefix=self.name, domain=MS_DOMAIN, before=node)
        if add is not None:
            graph.add_node("Add", [target, add], [out], prefix=self.name, before=node)

    # ------------------------------------------------------------------ the token embedding
    def _embedding(self, graph: Graph, node: Node, run: _Run) -> str:
        """Rewrite the token embedding's Gather to GatherBlockQuantized; "" when done or not an embedding, else why not."""
        if len(node.inputs) != 2 or not self._reads_input_ids(graph, node.inputs[1]):
            return ""
        table = node.inputs[0]
        if int(node.attrs.get("axis", 0)) != 0:
            return "the token embedding's Gather is not along axis 0"
        problem = self._weight_problem(graph, table, node)
        if problem is not None:
            return problem
        width = dtype_and_shape(graph, table)[1][1]
        if width % self.block_size:
            return f"the embedding width {width} is not a multiple of the block size {self.block_size}"
        blocks = self._tied(graph, table, run)
        if blocks is None:
            made = self._blocks(graph, table, True, 1.0, run, self.embedding_bits)  # E [V, H] = W^T, W [H, V]: blocks along rows
            if isinstance(made, str):
                return made
            blocks = made
        else:
            run.count("tied_embedding")
            run.count("bytes_before", blocks.k * blocks.n * 4)  # the fp32 table goes; its blocks are the projection's
        data = blocks.gather_data(graph, self.name)  # [V, H * bits / 8]: the same bytes as the projection's blocks
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": blocks.block_size, "bits": blocks.bits}
        out = node.outputs[0]
        ids = node.inputs[1]
        graph.remove_nodes([node])
        inputs = [data, ids, blocks.scales] + ([blocks.zero_points] if blocks.zero_points is not None else [])
        graph.add_node("GatherBlockQuantized", inputs, [out], attrs, prefix=self.name, domain=MS_DOMAIN, before=node)
        run.count("embedding")
        return ""

    def _tied(self, graph: Graph, table: Tensor, run: _Run) -> Blocks | None:
        """The blocks of a projection whose weight is this table's transpose (tied), if one was quantized."""
        order = (self.embedding_bits, self.vocab_bits, self.bits)
        for bits in order:
            found = run.done.get((id(table), True, 1.0, bits, self.block_size))
            if found is not None:
                return found
        shape = dtype_and_shape(graph, table)[1]
        candidates = sorted((b for b in run.done.values() if b.alpha == 1.0 and b.block_size == self.block_size and [b.n, b.k] == shape),
                            key=lambda b: order.index(b.bits))  # fmt: skip
        if not candidates:
            return None
        values = graph.const_value(table)  # E [V, H]; a tied projection's W [H, V] is E^T (an exporter's copy of it)
        if values is None:
            return None
        for b in candidates:
            w = graph.const_value(b.source)
            if w is not None and np.array_equal(w if b.transposed else w.T, values):
                return b
        return None

    @staticmethod
    def _is_vocab_projection(graph: Graph, node: Node) -> bool:
        """True if ``node``'s output is a graph output, through shape-only ops (the logits)."""
        t = node.outputs[0]
        outputs = {id(o) for o in graph.outputs}
        for _ in range(8):
            if id(t) in outputs:
                return True
            users = graph.consumers(t)
            if len(users) != 1 or users[0].op not in _ID_PASSTHROUGH or is_custom_domain(users[0].domain) or not users[0].outputs:
                return False
            t = users[0].outputs[0]
        return False

    @staticmethod
    def _reads_input_ids(graph: Graph, ids: Tensor) -> bool:
        t: Tensor | None = ids
        for _ in range(8):
            if t is None:
                return False
            if any(i is t for i in graph.inputs):
                return t.name == "input_ids"
            prod = graph.producer(t)
            if prod is None or prod.op not in _ID_PASSTHROUGH or is_custom_domain(prod.domain) or not prod.inputs:
                return False
            t = prod.inputs[0]
        return False
