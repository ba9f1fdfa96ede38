"""The tests' one helper module: random-weight models, ONNX Runtime runners, the pass checks, the tools and the CLI.

Everything here is offline and tiny, so a test can build what it needs in
well under a second. The pytest fixtures (``golden``, ``--update-golden``)
live in ``conftest.py``.

The pass checks: a pass test writes its input graph as
``tests/golden/<pass>/<case>.before.onnxtxt`` (ONNX text, hand-written or
generated once) and calls :func:`check_case`, which runs the pass, compares the
result with ``<case>.after.onnxtxt`` (rewritten by ``pytest --update-golden``),
checks the graph, compares outputs with onnxruntime on random inputs, and runs
the pass a second time to prove it is idempotent.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort

from qgraph.devtools.golden import canonical_text
from qgraph.ir.contract import RETAINED_SUFFIX
from qgraph.ir.graph import Graph
from qgraph.pipeline.manager import Pass, PassResult

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
GOLDEN_DIR = Path(__file__).parent / "golden"
#: A two-layer GPT-2 exported by Hugging Face Optimum.
OPTIMUM = Path(__file__).parent / "data" / "optimum-gpt2-2l" / "model.onnx"
#: The environment the CLI runs in: offline, with this checkout on the path.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------- the tools
def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as module ``name`` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- models
#: A tiny GPT-2 with an odd head count and a vocabulary that is not a power of two.
TINY_GPT2: dict[str, Any] = dict(n_layer=2, n_head=3, n_embd=48, vocab_size=397, n_positions=64)


def random_gpt2(path: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """A random-weight ``GPT2LMHeadModel`` in eval mode and its config.

    ``overrides`` change :data:`TINY_GPT2`. With ``path`` the model is also
    saved there (``save_pretrained``), a local model folder for the loaders.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = {**TINY_GPT2, **overrides}
    # GPT-2's default bos/eos (50256) lie outside a small vocabulary.
    kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
    kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
    config = GPT2Config(**kwargs)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    if path is not None:
        model.save_pretrained(path)
    return config, model


def word_tokenizer(path: str | Path, vocab_size: int, *, chat_template: str | None = None) -> Any:
    """A word-level tokenizer over ``<unk> <s> </s> w3 ... w{vocab_size-1}`` (plus ``user:`` and ``assistant:`` where a
    ``chat_template`` is given, as the last two ids), made offline with ``tokenizers`` and saved into ``path``
    beside a random model: the model folder then takes text prompts. Words split on whitespace; ``<s>`` starts
    every text, as Llama's tokenizer does. Returns the tokenizer, reloaded from ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    if chat_template is not None:
        words[-2:] = ["user:", "assistant:"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=chat_template)
    tok.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------- ONNX Runtime
def ort_run(path: str | Path, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX file once on the CPU; returns every output (or ``outputs``) by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the test machine's cores are shared
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def session(graph: Graph) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over ``graph`` with its weights inline and no graph optimizations (the graph as written)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(graph.to_proto_inline().SerializeToString(), opts, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic dims take ``dims`` (default 3)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (dims or {}).get(str(d), 3) for d in i.shape]
        if "float16" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16)
        elif "float" in i.type or "double" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float64 if "double" in i.type else np.float32)
        elif "bool" in i.type:
            feeds[i.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[i.name] = rng.integers(0, 5, shape).astype(np.int64 if "int64" in i.type else np.int32)
    return feeds


def run_shared_state(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], wanted: list[str] | None = None) -> list[np.ndarray]:
    """Run with each ``past`` input and its ``<past>_RetainedState`` output bound to one buffer, as the
    runtime binds them (a step updates its cache in place); returns the ``wanted`` outputs (default: all) in that order."""
    b = sess.io_binding()
    names = [o.name for o in sess.get_outputs()]
    shared = {n + RETAINED_SUFFIX: ort.OrtValue.ortvalue_from_numpy(np.array(v)) for n, v in feeds.items() if n + RETAINED_SUFFIX in names}
    for name, value in feeds.items():
        if name + RETAINED_SUFFIX in shared:
            b.bind_ortvalue_input(name, shared[name + RETAINED_SUFFIX])
        else:
            b.bind_cpu_input(name, value)
    for name in names:  # bound in the session's order, which is the order copy_outputs_to_cpu returns
        if name in shared:
            b.bind_ortvalue_output(name, shared[name])
        else:
            b.bind_output(name)
    sess.run_with_iobinding(b)
    by_name = dict(zip(names, b.copy_outputs_to_cpu()))
    return [by_name[n] for n in wanted or names]


def assert_same_outputs(
    a: Graph,
    b: Graph,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    shared_state: bool | str = False,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """Run both graphs on the same random inputs and compare every output.

    ``shared_state``: run ``b`` with its caches updated in place (:func:`run_shared_state`); ``"both"``: ``a`` too
    (a graph whose caches are GroupQueryAttention's already: it writes only the step's slots).
    ``feeds``: inputs to use instead of random ones."""
    sa, sb = session(a), session(b)
    feeds = random_feeds(sa, seed, dims) | (feeds or {})
    names = [o.name for o in sa.get_outputs()]
    ra = run_shared_state(sa, feeds, names) if shared_state == "both" else sa.run(names, feeds)
    feeds_b = {k: v for k, v in feeds.items() if k in {i.name for i in sb.get_inputs()}}
    rb = run_shared_state(sb, feeds_b, names) if shared_state else sb.run(names, feeds_b)
    for name, x, y in zip(names, ra, rb):
        np.testing.assert_allclose(y, x, atol=atol, rtol=rtol, err_msg=f"output {name} differs")


# --------------------------------------------------------------------------- the pass checks
def run_pass(p: Pass, graph: Graph) -> PassResult:
    """Run a pass, then the cleanup stage (as the pipeline would)."""
    result = p.run(graph)
    result.graph.cleanup()
    return result


def check_case(
    make_pass: Callable[[], Pass],
    case: str,
    golden: Any,
    *,
    expect_modified: bool,
    expect_stats: dict[str, Any] | None = None,
    atol: float = 1e-5,
    shared_state: bool | str = False,
    feeds: dict[str, np.ndarray] | None = None,
) -> Graph:
    """The standard pass test for ``tests/golden/<pass>/<case>``; returns the result.

    ``feeds``: inputs to use instead of random ones (the rest stay random)."""
    p = make_pass()
    before_path = GOLDEN_DIR / p.name / f"{case}.before.onnxtxt"
    before = Graph.parse(before_path.read_text())
    before.cleanup()  # the same node order a no-op run ends with
    graph = Graph.parse(before_path.read_text())
    result = run_pass(p, graph)
    assert result.modified is expect_modified, f"{p.name} on {case}: modified={result.modified}, stats={result.stats}"
    if expect_stats is not None:
        for k, v in expect_stats.items():
            assert result.stats.get(k) == v, f"{p.name} on {case}: stats {result.stats}, expected {k}={v}"
    out = result.graph
    out.check()
    golden.check(out, f"{p.name}/{case}.after.onnxtxt")
    if not expect_modified:
        assert canonical_text(out) == canonical_text(before), "a pass that reports no change must not change the graph"
    assert_same_outputs(before, out, atol=atol, shared_state=shared_state, feeds=feeds)
    again = run_pass(make_pass(), out)
    assert again.modified is False, f"{p.name} is not idempotent on {case}: second run stats {again.stats}"
    return out


def declined_reasons(fusion: Callable[[], Any], case: str, golden: Any) -> list[str]:
    """Run a near-miss case of a fusion (the graph must not change); returns its decline reasons."""
    made: list[Any] = []

    def make() -> Any:
        made.append(fusion())
        return made[-1]

    check_case(make, case, golden, expect_modified=False)
    return [m.reason for m in made[0].near_misses]


# --------------------------------------------------------------------------- the CLI in subprocesses
def cli_command(*args: str) -> list[str]:
    """The command line of ``qgraph ARGS`` run from this checkout."""
    return [sys.executable, "-m", "qgraph.cli", *args]


def run_all(
    commands: list[list[str]], env: dict[str, str] | None = None, timeout: float = 120, jobs: int = 3
) -> list[subprocess.CompletedProcess[str]]:
    """Run commands a few at a time (the machine is small); a command that hangs fails the test."""
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(commands)
    running: list[tuple[int, subprocess.Popen[str], float]] = []
    todo = list(enumerate(commands))
    while todo or running:
        while todo and len(running) < jobs:
            i, cmd = todo.pop(0)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV, cwd=ROOT)
            running.append((i, proc, time.monotonic()))
        i, proc, started = running.pop(0)
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"{commands[i]} did not finish in {timeout} s (did it open a FIFO?)") from None
        results[i] = subprocess.CompletedProcess(commands[i], proc.returncode, out, err)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- the runtime against Hugging Face
def generate_recording_logits(rt: Any, prompts: list[list[int]], max_new_tokens: int, **kwargs: Any) -> tuple[Any, list[list[np.ndarray]]]:
    """``rt.generate(prompts, ...)`` (a ``qgraph.runtime.Runtime``), and per prompt the logits each of its tokens
    was chosen from: entry 0 after the whole prompt (its last prefill step), entry k after its k-th token (a decode step).

    The steps are recorded as ``generate`` makes them; a step belongs to a row when the row has a valid
    position in it (the runtime pads rows with -1), so the record does not depend on the positions being right.
    """
    groups: list[list[tuple[str, np.ndarray, np.ndarray]]] = []
    step, reset = rt.step, rt.reset

    def recording_step(spec: str, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        logits = step(spec, ids, pos)
        groups[-1].append((spec, np.array(pos), np.array(logits, dtype=np.float32)))
        return logits

    def recording_reset() -> None:  # generate resets the caches once per group of batch_size prompts
        reset()
        groups.append([])

    rt.step, rt.reset = recording_step, recording_reset
    try:
        out = rt.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
    finally:
        del rt.step, rt.reset
    per_prompt: list[list[np.ndarray]] = []
    for g, group in enumerate(groups):
        for b in range(min(rt.batch_size, len(prompts) - g * rt.batch_size)):
            mine = [(spec, logits[b, -1]) for spec, pos, logits in group if (pos[b] >= 0).any()]
            per_prompt.append([x for s, x in mine if s == "prefill"][-1:] + [x for s, x in mine if s == "decode"])
    return out, per_prompt


def hf_logits_along(model: Any, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Hugging Face's logits (float32, [len(tokens), vocab]) that chose each of ``tokens`` after ``prompt``,
    from one forward over ``prompt + tokens`` (teacher-forced: an early wrong token does not hide the later steps)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)])).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float().numpy()


def assert_logits_match_hf(
    model: Any, prompts: list[list[int]], tokens: list[list[int]], logits: list[list[np.ndarray]], *, atol: float
) -> None:
    """Every step's logits (:func:`generate_recording_logits`), for every prompt, equal Hugging Face's on the same
    tokens (:func:`hf_logits_along`) within ``atol``."""
    for i, (prompt, toks, got) in enumerate(zip(prompts, tokens, logits, strict=True)):
        assert len(got) == len(toks), f"prompt {i}: {len(toks)} tokens chosen from {len(got)} steps' logits"
        want = hf_logits_along(model, prompt, toks)
        for k, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"prompt {i}, step {k} (0: after the prompt)")


def hf_greedy(model: Any, prompt: list[int], n: int, *, distinct: int = 0) -> list[int]:
    """Hugging Face's greedy continuation of ``prompt`` (``n`` tokens, no EOS stop unless the config has one).

    ``distinct``: assert the reference has at least that many different tokens. A model that repeats one
    token under greedy decoding agrees with a runtime whose cache is broken (random GPT-2s with the default
    initializer_range 0.02 do; 0.3 gives varied tokens).
    """
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=model.config.eos_token_id)  # fmt: skip
    tokens = out[0, len(prompt) :].tolist()
    assert len(set(tokens)) >= distinct, f"the reference {tokens} has fewer than {distinct} distinct tokens: it cannot see a cache bug"
    return tokens


def hf_window_scores(model: Any, ids: list[int], wins: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face's negative log-likelihood (float64) and top-1 prediction of every scored target of ``wins``
    (``qgraph.runtime.perplexity.windows``): one forward per window over its tokens, from position 0."""
    import torch

    nll: list[np.ndarray] = []
    top: list[np.ndarray] = []
    for w in wins:
        with torch.no_grad():
            logits = model(torch.tensor([ids[w.begin : w.end]])).logits[0].double()
        rows = logits[w.scored - 1 - w.begin : w.end - 1 - w.begin]  # row t - 1 predicts target t
        targets = torch.tensor(ids[w.scored : w.end])
        nll.append((-torch.log_softmax(rows, -1)[torch.arange(len(targets)), targets]).numpy())
        top.append(rows.argmax(-1).numpy())
    return np.concatenate(nll), np.concatenate(top)
