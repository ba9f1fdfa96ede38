"""The cost of checking an artifact's hashes when it is opened, on a random-weight GPT-2.

    python tools/measure_verify.py --shape gpt2 --workdir /tmp/qgraph-verify --rounds 7

builds (once, kept in the work directory) the shape's Hugging Face folder, its
export and a cpu artifact as ``qgraph bench`` does, then times
``Runtime(artifact)`` in interleaved rounds: without verification, with every
file hashed (the record of the last verification dropped first), and with that
record in place (unchanged files are not hashed again). Prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gpt2", help="a random shape of qgraph bench (gpt2, gpt2-medium, ...)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qgraph-verify"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from qgraph.artifact.verify import forget_verification, hash_tree
    from qgraph.compile import compile_model
    from qgraph.frontend.export import export_model
    from qgraph.frontend.families import random_family
    from qgraph.runtime import Runtime

    work, art = args.workdir, args.workdir / "cpu"
    if not (art / "manifest.json").is_file():
        found = random_family(args.shape)
        if found is None:
            raise SystemExit(f"unknown shape {args.shape}")
        family, shape = found
        folder = family.save_random(shape, work / f"random-{args.shape}")
        raw = export_model(str(folder), work / "raw.onnx", exporter="dynamo").path
        compile_model(raw, "cpu", art, prefill_seq_len=32, ctx_len=128, batch_size=1, options={"threads": args.threads})
    Runtime(art, threads=args.threads)  # warms the page cache (and records the verification once the files are 2 s old)
    time.sleep(2.5)
    Runtime(art, threads=args.threads)

    def full() -> Runtime:
        forget_verification(art)
        return Runtime(art, threads=args.threads)

    ways = {
        "no verification": lambda: Runtime(art, threads=args.threads, verify=False),
        "every file hashed": full,
        "verification recorded": lambda: Runtime(art, threads=args.threads),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.rounds):
        for name, open_it in ways.items():
            t = time.perf_counter()
            open_it()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:22s} median {statistics.median(ts):.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")
    t = time.perf_counter()
    hashes = hash_tree(art)
    size = sum((art / n).stat().st_size for n in hashes)
    print(f"hashing alone          {time.perf_counter() - t:.3f} s for {size / 1e6:.0f} MB in {len(hashes)} files")


if __name__ == "__main__":
    main()
