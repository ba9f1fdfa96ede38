"""The retained-state runtime: sessions per specialization, KV kept between steps.

``Runtime(artifact_dir)`` opens one ONNX Runtime session per specialization of a
compiled artifact, after checking every file against the manifest's hashes
(:mod:`qgraph.artifact.verify`): a damaged artifact is one :class:`ArtifactError`
naming the file, and a dry run is refused. The KV buffers are allocated once;
where the target allows (``inplace_kv``), each ``past`` input and its ``_RetainedState`` output are
bound to the same buffer, so a step updates the cache in place with no copies.
Otherwise the outputs are bound to a second set of buffers and the two sets
swap roles after every step (still no per-step allocation).

``generate`` prefills prompts in chunks of prefill_seq_len tokens (padding through
``position_ids`` = -1), then decodes one token per row per step, greedy or
sampled, and returns the tokens and latency statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.artifact.manifest import ArtifactError, Manifest
from qgraph.artifact.verify import verify_artifact
from qgraph.artifact.weights import read_fed_weights
from qgraph.errors import QGraphError
from qgraph.ir.contract import RETAINED_SUFFIX, pad_chunk
from qgraph.pipeline.options import DEFAULT_MAX_NEW_TOKENS, check_at_least_one, check_prompts, check_token_ids
from qgraph.runtime.sampling import GenerationError, Sampling, choose

log = logging.getLogger(__name__)

#: Called with (row, token id) for every generated token, as soon as it exists.
Streamer = Callable[[int, int], None]
#: The numpy dtype of a buffer bound to a float input or output, by ONNX Runtime's type name (numpy has no bfloat16).
_BUFFER_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _buffer_dtype(arg: Any) -> Any:
    """The dtype of the buffer bound to ``arg`` (a session's input or output): the graph's own, float16 models included."""
    if arg.type not in _BUFFER_DTYPES:
        raise GenerationError(
            f"this artifact's '{arg.name}' is {arg.type}; the runtime holds caches and logits as float32 or float16: "
            "export the model with --dtype float32 or float16"
        )
    return _BUFFER_DTYPES[arg.type]


@dataclass
class Stats:
    """Latency statistics of one generate() call (the seed's figures)."""

    ttft_s: float  # start -> first token of every row
    prefill_s: float  # time in prefill steps
    decode_s: float
    decode_tokens: int
    generated_tokens: int
    prompt_tokens: int
    e2e_s: float
    decode_tokens_per_s: float
    total_tokens_per_s: float
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("time to first token (ttft_s)", f"{self.ttft_s:.4f} s"),
            ("prefill (prefill_s)", f"{self.prefill_s:.4f} s for {self.prompt_tokens} prompt tokens"),
            (
                "decode (decode_tokens_per_s)",
                f"{self.decode_tokens_per_s:.1f} tokens/s ({self.decode_tokens} tokens in {self.decode_s:.4f} s)",
            ),
            ("total (total_tokens_per_s)", f"{self.total_tokens_per_s:.1f} tokens/s ({self.generated_tokens} generated)"),
            ("end to end (e2e_s)", f"{self.e2e_s:.4f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per prompt
    stats: Stats
    finish_reasons: list[str] = field(default_factory=list)  # "eos", "length", "ctx_len"


class Runtime:
    """Run a compiled artifact directory (see the module docstring)."""

    def __init__(self, artifact_dir: str | Path, *, threads: int | None = None, inplace: bool | None = None, verify: bool = True) -> None:
        """``verify=False`` skips the hash check (for measuring it; a damaged file then fails later, or not at all)."""
        import onnxruntime as ort

        from qgraph.targets import get_target

        self.dir = Path(artifact_dir)
        self.manifest = Manifest.load(self.dir)
        m = self.manifest
        if m.dry_run:
            raise ArtifactError(f"{self.dir} is a dry run: it holds the {m.target} compiler's inputs, nothing compiled to run; "
                                "compile without --dry-run (or run its compile script) first")  # fmt: skip
        if verify:
            verify_artifact(self.dir, m)
        self.target = get_target(m.target)
        #: The options the artifact was compiled with, as the manifest recorded them.
        self.options = m.options
        self.batch_size, self.ctx_len, self.prefill_seq_len = m.options.batch_size, m.options.ctx_len, m.options.prefill_seq_len
        self._ort = ort
        self._fed = self._load_fed_weights()  # before the sessions: a bad weights file is named here
        self.sessions = {s.name: self._session(s.file, threads) for s in m.specializations}
        self._check_shapes()
        sess = self.sessions["decode"]
        self.cache_names = [i.name for i in sess.get_inputs() if i.name.startswith(("past_key.", "past_value."))]
        kv = next(i for i in sess.get_inputs() if i.name == self.cache_names[0])
        self.cache_shape = tuple(int(d) for d in kv.shape)
        self.cache_dtype = _buffer_dtype(kv)
        logits = next(o for o in sess.get_outputs() if o.name == "logits")
        self.vocab_size = int(logits.shape[-1])
        self.inplace = self.target.inplace_kv if inplace is None else inplace
        # The buffers are numpy arrays that the OrtValues wrap without copying: reset() zeroes them in place.
        self._arrays: list[np.ndarray] = []
        self._a = self._cache_buffers()
        self._b = self._a if self.inplace else self._cache_buffers()
        # The logits in the graph's dtype (float16 for a float16 model): ONNX Runtime refuses an output bound to another.
        self._logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((self.batch_size, 1, self.vocab_size), _buffer_dtype(logits)))
        self._bindings: dict[tuple[str, bool], Any] = {}

    # -- one step ---------------------------------------------------------------
    def _binding(self, spec: str, flipped: bool) -> Any:
        key = (spec, flipped)
        if key not in self._bindings:
            sess = self.sessions[spec]
            b = sess.io_binding()
            src, dst = (self._b, self._a) if flipped else (self._a, self._b)
            for n in self.cache_names:
                b.bind_ortvalue_input(n, src[n])
                b.bind_ortvalue_output(n + RETAINED_SUFFIX, dst[n])
            b.bind_ortvalue_output("logits", self._logits)
            for i in sess.get_inputs():
                if i.name in self._fed:
                    b.bind_ortvalue_input(i.name, self._fed[i.name])
            self._bindings[key] = b
        return self._bindings[key]

    def _session(self, file: str, threads: int | None) -> Any:
        try:
            return self.target.create_session(self.dir / file, self.manifest.options.target_options, threads=threads)
        except QGraphError:
            raise
        except Exception as e:  # ONNX Runtime raises its own types; one line, not its traceback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ArtifactError(f"ONNX Runtime cannot load {self.dir / file}: {first[:300]}; recompile the artifact") from None

    def _check_shapes(self) -> None:
        """Each graph takes the shapes the manifest's options give it (a manifest edited or damaged after the compile would not)."""
        for s in self.manifest.specializations:
            inputs = {i.name: list(i.shape) for i in self.sessions[s.name].get_inputs()}
            kv = [shape for name, shape in inputs.items() if name.startswith(("past_key.", "past_value."))]
            want = {"input_ids": [s.batch_size, s.seq_len], "cache": [s.batch_size, s.ctx_len]}
            got = {"input_ids": inputs.get("input_ids"), "cache": [kv[0][0], kv[0][2]] if kv and len(kv[0]) == 4 else None}
            for what in want:
                if got[what] != want[what]:
                    raise ArtifactError(f"{self.dir / s.file} takes {what} {got[what]} but manifest.json gives the {s.name} "
                                        f"specialization {want[what]}; recompile the artifact")  # fmt: skip

    def _load_fed_weights(self) -> dict[str, Any]:
        """The weights the artifact leaves to the runtime (``fed_weights``), one OrtValue per byte range."""
        try:
            arrays = read_fed_weights(self.dir, self.manifest.fed_weights)
        except ArtifactError as e:
            raise GenerationError(str(e)) from None  # a Runtime that cannot open its artifact says so as it always has
        values: dict[int, Any] = {}
        return {name: values.setdefault(id(a), self._ort.OrtValue.ortvalue_from_numpy(a)) for name, a in arrays.items()}

    def _cache_buffers(self) -> dict[str, Any]:
        arrays = {n: np.zeros(self.cache_shape, self.cache_dtype) for n in self.cache_names}
        self._arrays += arrays.values()
        return {n: self._ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}

    def reset(self) -> None:
        """Zero the caches (a new batch of prompts); in place, each buffer once (about 0.4 ms for gpt2-small)."""
        for a in self._arrays:
            a.fill(0)
        self._flipped = False

    def step(self, spec: str, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one specialization; returns logits [batch, 1, vocab] (a view, valid until the next step)."""
        if spec == "prefill" and self.manifest.prefill_positions == "consecutive":
            self._check_chunk(np.asarray(position_ids))
        flipped = getattr(self, "_flipped", False)
        b = self._binding(spec, flipped)
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        self.sessions[spec].run_with_iobinding(b)
        if not self.inplace:
            self._flipped = not flipped
        return self._logits.numpy()

    def _check_chunk(self, pos: np.ndarray) -> None:
        """The chunk contract of a prefill graph that fuse-decode-attention rewrote (see qgraph.compile)."""
        for b, row in enumerate(pos.reshape(pos.shape[0], -1)):
            n = int((row >= 0).sum())
            if n == 0 or not (row[:n] == row[0] + np.arange(n)).all() or (row[n:] != -1).any() or row[0] + len(row) > self.ctx_len:
                raise GenerationError(
                    f"row {b} of this prefill chunk has positions {row.tolist()}; this artifact's prefill graph takes the "
                    f"runtime's chunks only: consecutive positions from the chunk's first token, -1 (padding) only after "
                    f"them, and the first position + {len(row)} <= ctx_len {self.ctx_len}"
                )

    def cache(self) -> dict[str, np.ndarray]:
        """A copy of the current caches (for tests and debugging)."""
        cur = self._b if getattr(self, "_flipped", False) else self._a
        return {n: v.numpy().copy() for n, v in cur.items()}

    # -- generation -----------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        eos_token_id: int | Sequence[int] | None = None,
        sampling: Sampling | None = None,
        streamer: Streamer | None = None,
    ) -> GenerationOutput:
        """Generate for any number of prompts, ``batch_size`` at a time."""
        sampling = sampling or Sampling()
        sampling.check()
        check_at_least_one("max_new_tokens", max_new_tokens)
        if not prompts:
            raise GenerationError("no prompts given")
        check_prompts(prompts, self.ctx_len)
        prompts = check_token_ids(prompts, self.vocab_size)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        rng = np.random.default_rng(sampling.seed)
        tokens: list[list[int]] = []
        reasons: list[str] = []
        totals = dict(prefill=0.0, decode=0.0, decode_tokens=0, ttft=0.0)
        start = time.perf_counter()
        for g in range(0, len(prompts), self.batch_size):
            group = [list(map(int, p)) for p in prompts[g : g + self.batch_size]]
            out, why = self._generate_group(group, max_new_tokens, eos, sampling, rng, streamer, g, totals, start)
            tokens += out
            reasons += why
        e2e = time.perf_counter() - start
        generated = sum(len(t) for t in tokens)
        stats = Stats(
            ttft_s=totals["ttft"],
            prefill_s=totals["prefill"],
            decode_s=totals["decode"],
            decode_tokens=int(totals["decode_tokens"]),
            generated_tokens=generated,
            prompt_tokens=sum(len(p) for p in prompts),
            e2e_s=e2e,
            decode_tokens_per_s=totals["decode_tokens"] / totals["decode"] if totals["decode"] > 0 else 0.0,
            total_tokens_per_s=generated / e2e if e2e > 0 else 0.0,
            batch_size=self.batch_size,
        )
        if "ctx_len" in reasons:
            log.warning("generation stopped at ctx_len %d for %d prompt(s); compile with a larger --ctx-len for longer outputs",
                        self.ctx_len, reasons.count("ctx_len"))  # fmt: skip
        return GenerationOutput(tokens, stats, reasons)

    def _generate_group(self, group: list[list[int]], max_new: int, eos: set[int], sampling: Sampling, rng: np.random.Generator,
                        streamer: Streamer | None, offset: int, totals: dict[str, float], start: float) -> tuple[list[list[int]], list[str]]:  # fmt: skip
        B = self.batch_size
        rows = group + [[] for _ in range(B - len(group))]  # unused rows are all padding
        self.reset()
        t0 = time.perf_counter()
        done = [0] * B
        nxt: list[int | None] = [None] * B
        while any(done[b] < len(rows[b]) for b in range(B)):
            chunk = [rows[b][done[b] : done[b] + self.prefill_seq_len] for b in range(B)]
            ids, pos = pad_chunk(chunk, done, self.prefill_seq_len)
            logits = self.step("prefill", ids, pos)
            for b in range(B):
                if chunk[b]:
                    done[b] += len(chunk[b])
                    if done[b] == len(rows[b]):
                        nxt[b] = choose(logits[b, 0], sampling, rng)
        prefill = time.perf_counter() - t0
        totals["prefill"] += prefill
        if offset == 0:
            totals["ttft"] = time.perf_counter() - start
        out: list[list[int]] = [[] for _ in group]
        reason = [""] * len(group)
        active = [True] * len(group)

        def accept(b: int, tok: int) -> None:
            out[b].append(tok)
            if streamer is not None:
                streamer(offset + b, tok)
            if tok in eos:
                active[b], reason[b] = False, "eos"
            elif len(out[b]) >= max_new:
                active[b], reason[b] = False, "length"
            elif len(group[b]) + len(out[b]) >= self.ctx_len:
                active[b], reason[b] = False, "ctx_len"

        for b in range(len(group)):
            accept(b, nxt[b])  # type: ignore[arg-type]
        t1 = time.perf_counter()
        steps = 0
        while any(active):
            ids = np.zeros((B, 1), np.int64)
            pos = np.full((B, 1), -1, np.int64)
            for b in range(len(group)):
                if active[b]:
                    ids[b, 0] = out[b][-1]
                    pos[b, 0] = len(group[b]) + len(out[b]) - 1
            logits = self.step("decode", ids, pos)
            steps += 1
            for b in range(len(group)):
                if active[b]:
                    accept(b, choose(logits[b, 0], sampling, rng))
                    totals["decode_tokens"] += 1
        totals["decode"] += time.perf_counter() - t1
        return out, reason
