#!/usr/bin/env python
"""Build two cpu artifacts of one random Llama, with and without fuse-rotary, for tools/ab_decode.py.

    python tools/rotary_artifacts.py OUT [--shape small|llama] [--ctx-len 256] [--prefill-seq-len 32]
    python tools/ab_decode.py OUT/plain OUT/rotary --steps 300 --threads 2

``small``: hidden 256, 4 layers, 8 heads over 4 KV heads, intermediate 688, vocab 2000. ``llama``: the Llama
speed shape (``random:llama``). ``OUT/plain`` is compiled with the cpu target's legalize slot lacking
fuse-rotary (the rotary stays Slice/Neg/Concat/Mul/Add over cos/sin computed each step). Prints each
specialization's node count and its RotaryEmbedding and GroupQueryAttention nodes. See PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688,
             vocab_size=2000, max_position_embeddings=512, initializer_range=0.3)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=["small", "llama"], default="small")
    ap.add_argument("--ctx-len", type=int, default=256)
    ap.add_argument("--prefill-seq-len", type=int, default=32)
    args = ap.parse_args()

    import onnx

    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.families import FAMILIES
    from qgraph.frontend.families.llama import RANDOM_SHAPES
    from qgraph.targets.cpu import CpuTarget

    shape = SMALL if args.shape == "small" else RANDOM_SHAPES["llama"]
    FAMILIES["llama"].save_random(shape, args.out / "hf", seed=0)
    raw = export_model(str(args.out / "hf"), args.out / "raw.onnx").path
    slots = dict(CpuTarget.slots)
    for name, legalize in (("rotary", slots["legalize"]), ("plain", tuple(p for p in slots["legalize"] if p != "fuse-rotary"))):
        CpuTarget.slots = {**slots, "legalize": legalize}
        art = compile_model(raw, "cpu", args.out / name, prefill_seq_len=args.prefill_seq_len, ctx_len=args.ctx_len, batch_size=1)
        for spec in ("prefill", "decode"):
            ops = collections.Counter(n.op_type for n in onnx.load(str(art / f"{spec}.onnx"), load_external_data=False).graph.node)
            print(f"{name} {spec}: {sum(ops.values())} nodes, {ops['RotaryEmbedding']} RotaryEmbedding, "
                  f"{ops['GroupQueryAttention']} GroupQueryAttention")  # fmt: skip
    CpuTarget.slots = slots


if __name__ == "__main__":
    main()
