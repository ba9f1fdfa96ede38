"""Compile for cpu and run: tokens equal Hugging Face's greedy generate and logits equal Hugging Face's at
every step, in-place KV, chunked prefill, padded batches, stopping rules, sampling, streaming and errors.

The model is a random GPT-2 with initializer_range 0.3: its greedy output varies (the default 0.02 repeats
one token, and a runtime that writes every decode step into one cache slot then gives the same tokens).
ORT CPU and PyTorch compute in float32: the logits (up to about 6 here) differ by at most 5e-6 (measured),
so ATOL = 1e-4 has a 20x margin while a wrong cache slot or position moves them by 1 or more (measured with the
decode position frozen, one too high, and the prompt's chunks starting one too late).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import assert_logits_match_hf, cli_command, generate_recording_logits, hf_greedy, random_gpt2, run_all

from qgraph.artifact.manifest import ArtifactError, Manifest
from qgraph.compile import CompileError, compile_model
from qgraph.runtime import GenerationError, Runtime, Sampling

torch = pytest.importorskip("torch")

PREFILL = 8
CTX = 48
ATOL = 1e-4  # see the module docstring
FORMAT_1 = Path(__file__).parent / "data" / "format-1-manifest.json"


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from qgraph.frontend.export import export_model

    config, model = random_gpt2(n_layer=2, n_head=3, n_embd=24, vocab_size=211, n_positions=64, seed=0, initializer_range=0.3)
    path = export_model(model, tmp_path_factory.mktemp("export") / "raw.onnx", exporter="torchscript").path
    return model, path


@pytest.fixture(scope="module")
def artifact(hf: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(hf[1], "cpu", tmp_path_factory.mktemp("art") / "cpu", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)


PROMPTS = [[5, 17, 42], [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [100, 3, 9, 9, 1]]  # one longer than P


def test_artifact_layout(artifact: Path) -> None:
    m = Manifest.load(artifact)
    assert (m.target, m.options.batch_size, m.options.ctx_len, m.options.prefill_seq_len) == ("cpu", 2, CTX, PREFILL)
    assert [(s.name, s.seq_len) for s in m.specializations] == [("prefill", PREFILL), ("decode", 1)]
    names = sorted(p.name for p in artifact.iterdir())
    assert names == ["decode.onnx", "manifest.json", "prefill.onnx", "weights.data"]  # weights stored once
    assert set(m.hashes) == {"decode.onnx", "prefill.onnx", "weights.data"}
    assert m.io["inputs"][0]["name"] == "input_ids" and m.io["outputs"][0]["name"] == "logits"
    assert "optimize" in m.pass_reports and "prefill" in m.pass_reports
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    for spec in ("prefill", "decode"):  # the cpu target's fuse-attention ran on both
        ran = [p["name"] for p in m.pass_reports[spec]["passes"]]
        assert ran[ran.index("fuse-attention") + 1] == "simplify-shapes" and "fuse-rotary" in ran
        ops = [n.op_type for n in onnx.load(str(artifact / f"{spec}.onnx"), load_external_data=False).graph.node]
        # One token a step: fuse-decode-attention turned each layer's cache writes and attention into one op
        # (a prefill chunk of two rows is declined: at batch 1 the prefill gets GroupQueryAttention too, below).
        fused = "GroupQueryAttention" if spec == "decode" else "MultiHeadAttention"
        assert ops.count(fused) == 2 and "Softmax" not in ops
        assert ("ScatterND" in ops) is (spec == "prefill")


def test_large_matmul_weights_are_bound_by_the_runtime(hf: tuple[Any, Path], artifact: Path, tmp_path: Path) -> None:
    # The default threshold (32 MiB) feeds nothing in this small model; 1 byte feeds every MatMul weight.
    assert Manifest.load(artifact).fed_weights == {}
    fed = compile_model(hf[1], "cpu", tmp_path / "fed", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2, options={"feed_min_bytes": 1})
    m = Manifest.load(fed)
    assert m.fed_weights, "the vocabulary projection's weight was not fed"
    for spec in ("prefill", "decode"):
        model = onnx.load(str(fed / f"{spec}.onnx"), load_external_data=False)
        inputs = {i.name for i in model.graph.input}
        assert set(m.fed_weights) <= inputs and not set(m.fed_weights) & {t.name for t in model.graph.initializer}
    for w in m.fed_weights.values():
        assert w["file"] == "weights.data" and w["dtype"] == "float32" and w["length"] == 4 * np.prod(w["shape"])
    rt = Runtime(fed)
    assert len({id(v) for v in rt._fed.values()}) == len({(w["offset"], w["length"]) for w in m.fed_weights.values()})  # one copy each
    out = rt.generate(PROMPTS, max_new_tokens=10)
    for prompt, got in zip(PROMPTS, out.tokens):
        assert got == hf_greedy(hf[0], prompt, 10, distinct=3)
    # A weights file cut short is reported, not read past: by its hash, and (unchecked) by the weight it ends in.
    w = next(iter(m.fed_weights.values()))
    with open(fed / "weights.data", "r+b") as f:
        f.truncate(int(w["offset"]) + 8)
    with pytest.raises(ArtifactError, match="weights.data .* does not match its sha256"):
        Runtime(fed)
    with pytest.raises(GenerationError, match="ends before weight"):
        Runtime(fed, verify=False)


def test_one_prompt_matches_hf_greedy(hf: tuple[Any, Path], artifact: Path) -> None:
    out = Runtime(artifact).generate([PROMPTS[0]], max_new_tokens=12)
    assert out.tokens[0] == hf_greedy(hf[0], PROMPTS[0], 12, distinct=3)


def test_three_prompts_at_batch_two_match_hf_greedy(hf: tuple[Any, Path], artifact: Path) -> None:
    out = Runtime(artifact).generate(PROMPTS, max_new_tokens=10)
    for prompt, got in zip(PROMPTS, out.tokens):
        assert got == hf_greedy(hf[0], prompt, 10, distinct=3)
    s = out.stats
    assert s.generated_tokens == sum(len(t) for t in out.tokens) and s.prompt_tokens == sum(map(len, PROMPTS))
    assert s.ttft_s > 0 and s.prefill_s > 0 and s.decode_tokens_per_s > 0 and s.total_tokens_per_s > 0 and s.e2e_s >= s.ttft_s
    table = s.table()
    for key in ("ttft_s", "prefill_s", "decode_tokens_per_s", "total_tokens_per_s", "e2e_s"):
        assert key in table and key in s.to_dict()


def test_logits_match_hf_at_every_step(hf: tuple[Any, Path], artifact: Path) -> None:
    """Three prompts at batch 2 (a padded row, a prompt of two chunks, a second group after a reset): the
    logits every token was chosen from equal Hugging Face's, step by step, and the tokens are its greedy ones."""
    out, logits = generate_recording_logits(Runtime(artifact), PROMPTS, 12)
    assert out.tokens == [hf_greedy(hf[0], p, 12, distinct=3) for p in PROMPTS]
    assert_logits_match_hf(hf[0], PROMPTS, out.tokens, logits, atol=ATOL)


def test_at_batch_one_prompt_chunks_run_as_group_query_attention_and_match_hf(hf: tuple[Any, Path], tmp_path: Path) -> None:
    """One row: fuse-decode-attention rewrites the prefill too; prompts of one chunk, two chunks (the last
    padded) and ctx_len - 1 tokens match HF greedy and HF's logits at every step, with the caches in place and
    double-buffered."""
    art = compile_model(hf[1], "cpu", tmp_path / "cpu1", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=1)
    ops = [n.op_type for n in onnx.load(str(art / "prefill.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and not {"ScatterND", "MultiHeadAttention"} & set(ops)
    assert Manifest.load(art).prefill_positions == "consecutive"
    rt = Runtime(art)
    rt.reset()
    ids = np.zeros((1, PREFILL), np.int64)
    for bad in ([0, 1, 3, 4, 5, 6, 7, 8], [-1, 0, 1, 2, 3, 4, 5, 6], [2, 3, -1, 4, -1, -1, -1, -1], [CTX - 4 + i for i in range(PREFILL)]):
        with pytest.raises(GenerationError, match="takes the runtime's chunks only"):
            rt.step("prefill", ids, np.array([bad], np.int64))
    long = [(7 * i) % 211 for i in range(CTX - 1)]  # fills the cache: the last chunk ends at its last slot
    for inplace in (True, False):
        rt = Runtime(art, inplace=inplace)
        for prompt in (PROMPTS[0], PROMPTS[1], long):
            n = min(12, CTX - len(prompt))
            out, logits = generate_recording_logits(rt, [prompt], n)
            assert out.tokens[0] == hf_greedy(hf[0], prompt, n, distinct=3 if n > 6 else 0), (inplace, len(prompt))
            assert_logits_match_hf(hf[0], [prompt], out.tokens, logits, atol=ATOL)


def test_worker_threads_stop_spinning_when_a_step_returns(artifact: Path) -> None:
    """The sessions spin between kernels but not after a run: no core burnt while Python waits.

    Without ``session.force_spinning_stop`` the two workers of this very model burn about
    0.09 s of CPU in the 0.3 s after a generate (measured); with it, none.
    """
    import resource
    import time

    rt = Runtime(artifact, threads=2)
    rt.generate([PROMPTS[0]], max_new_tokens=6)
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    burnt = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert burnt < 0.02, f"{burnt:.3f} s of CPU burnt while the runtime was idle"


def test_reset_zeroes_the_bound_buffers_in_both_modes(artifact: Path) -> None:
    # reset() fills the numpy arrays the OrtValues wrap; this reads the caches back through the OrtValues.
    for inplace in (True, False):
        rt = Runtime(artifact, inplace=inplace)
        rt.generate([PROMPTS[0]], max_new_tokens=3)
        assert any(np.any(v != 0) for v in rt.cache().values())
        rt.reset()
        assert all(np.all(v == 0) for v in rt.cache().values())
        rt._flipped = True  # the other buffer set of the copying mode, too
        assert all(np.all(v == 0) for v in rt.cache().values())


def test_in_place_kv_equals_copying(artifact: Path) -> None:
    a, b = Runtime(artifact, inplace=True), Runtime(artifact, inplace=False)
    assert a.inplace and not b.inplace
    a.reset()
    b.reset()
    ids = np.array([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0, 0, 0]])
    pos = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(a.step("prefill", ids, pos), b.step("prefill", ids, pos))
    for k in range(8):
        ids1, pos1 = np.array([[20 + k], [30 + k]]), np.array([[8 + k], [3 + k]])
        np.testing.assert_array_equal(a.step("decode", ids1, pos1), b.step("decode", ids1, pos1))
    ca, cb = a.cache(), b.cache()
    for n in ca:
        np.testing.assert_array_equal(ca[n], cb[n])


def test_stops_at_eos_and_at_ctx_len(hf: tuple[Any, Path], artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    rt = Runtime(artifact)
    first = rt.generate([PROMPTS[0]], max_new_tokens=5).tokens[0]
    out = rt.generate([PROMPTS[0]], max_new_tokens=5, eos_token_id=first[2])
    assert out.tokens[0] == first[: first.index(first[2]) + 1] and out.finish_reasons == ["eos"]
    with caplog.at_level(logging.WARNING):
        long = rt.generate([list(range(1, CTX - 3))], max_new_tokens=50)
    assert len(long.tokens[0]) == 4 and long.finish_reasons == ["ctx_len"]
    assert "ctx_len" in caplog.text


def test_sampling_is_seeded_and_streaming_sees_every_token(artifact: Path) -> None:
    rt = Runtime(artifact)
    seen: list[tuple[int, int]] = []
    s = Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a = rt.generate(PROMPTS[:2], max_new_tokens=6, sampling=s, streamer=lambda r, t: seen.append((r, t)))
    b = rt.generate(PROMPTS[:2], max_new_tokens=6, sampling=Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=7))
    assert a.tokens == b.tokens
    assert sorted(seen) == sorted((r, t) for r, row in enumerate(a.tokens) for t in row)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(prompts=[[]], max_new_tokens=3), "prompt 0 is empty"),
        (dict(prompts=[list(range(CTX))], max_new_tokens=3), "shorter than ctx_len"),
        (dict(prompts=[[1, 999]], max_new_tokens=3), "outside the vocabulary"),
        (dict(prompts=[], max_new_tokens=3), "no prompts"),
    ],
)
def test_bad_generate_arguments(artifact: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(GenerationError, match=match):
        Runtime(artifact).generate(**kwargs)


def test_a_ctx_len_beyond_the_models_positions_is_refused_by_optimize_and_compile(hf: tuple[Any, Path], tmp_path: Path) -> None:
    """The raw export's position table has 64 rows: --ctx-len 65 is refused by the CLI's optimize and compile in one
    line (exit 2), before anything is written (accepted, generation crashed in ONNX Runtime at position 64)."""
    raw = str(hf[1])
    commands = {"optimize": cli_command("optimize", raw, "-o", str(tmp_path / "opt.onnx"), "--ctx-len", "65"),
                "compile": cli_command("compile", raw, "--target", "cpu", "-o", str(tmp_path / "art"), "--ctx-len", "65")}  # fmt: skip
    for (name, _), res in zip(commands.items(), run_all(list(commands.values()))):
        errors = [line for line in res.stderr.splitlines() if not line.startswith("[qgraph] ")]  # progress lines aside
        assert (res.returncode, errors) == (2, [f"qgraph {name}: error: ctx_len 65 is larger than the model's maximum length 64; "
                                                "use --ctx-len 64 or less"]), res.stderr  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_bad_compile_arguments(hf: tuple[Any, Path], tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="larger than ctx_len"):
        compile_model(hf[1], "cpu", tmp_path / "a", prefill_seq_len=64, ctx_len=32)
    from qgraph.targets import TargetError

    with pytest.raises(TargetError, match="unknown target 'gpu'"):
        compile_model(hf[1], "gpu", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())


def test_manifest_is_json(artifact: Path) -> None:
    data = json.loads((artifact / "manifest.json").read_text())
    assert data["prefill_positions"] == "any"  # batch 2: the prefill keeps the general graph, any positions
    assert data["dry_run"] is False  # compiled: the runtime may run it


def _keys(x: Any, skip: tuple[str, ...] = ("pass_reports", "io")) -> list[str]:
    """Every key of a JSON value, nested ones too, except under ``skip`` (the passes' own stats, the IO contract's shapes)."""
    out: list[str] = []
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in skip:
                out += [k, *_keys(v, skip)]
    elif isinstance(x, list):
        for v in x:
            out += _keys(v, skip)
    return out


def test_the_manifest_records_each_value_once(artifact: Path) -> None:
    data = json.loads((artifact / "manifest.json").read_text())
    assert data["format"] == 2
    assert data["options"] == {"ctx_len": CTX, "prefill_seq_len": PREFILL, "batch_size": 2,
                               "target_options": {"threads": None, "feed_min_bytes": 32 << 20}, "quantize": None,
                               "quant_block_size": 32, "quant_vocab": "int8"}  # fmt: skip
    keys = _keys(data)
    for name in ("ctx_len", "prefill_seq_len", "batch_size", "target_options", "quantize", "quant_block_size", "quant_vocab"):
        assert keys.count(name) == 1, f"{name} is recorded {keys.count(name)} times"
    assert "seq_len" not in keys  # a specialization's width follows from the options
    assert data["specializations"] == [{"name": "prefill", "file": "prefill.onnx", "extra_files": []},
                                       {"name": "decode", "file": "decode.onnx", "extra_files": []}]  # fmt: skip
    assert data["model"] == {"num_layers": 2, "num_kv_heads": 3, "head_dim": 8, "vocab_size": 211, "dtype": "float32"}
    m = Manifest.load(artifact)
    assert [(s.name, s.batch_size, s.seq_len, s.ctx_len) for s in m.specializations] == [
        ("prefill", 2, PREFILL, CTX),
        ("decode", 2, 1, CTX),
    ]
    assert Runtime(artifact).options == m.options


def test_an_artifact_compiled_in_format_1_still_opens(artifact: Path, tmp_path: Path) -> None:
    """tests/data/format-1-manifest.json is the manifest the code before format 2 wrote when it compiled this
    very model with these options; beside this compile's files it reads as this compile's manifest does, and
    the runtime generates the same tokens from it (tools/ab_decode.py compares such artifacts)."""
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    shutil.copy(FORMAT_1, old / "manifest.json")
    assert json.loads(FORMAT_1.read_text())["format"] == 1
    now, before = Manifest.load(artifact), Manifest.load(old)
    assert before.options == now.options and before.model == now.model and before.io == now.io
    assert before.prefill_positions == now.prefill_positions and before.fed_weights == now.fed_weights == {}
    shape = [(s.name, s.batch_size, s.seq_len, s.ctx_len, s.file, s.extra_files) for s in now.specializations]
    assert [(s.name, s.batch_size, s.seq_len, s.ctx_len, s.file, s.extra_files) for s in before.specializations] == shape
    # Its hashes are those of the files the old code compiled, which today's compile no longer writes byte for byte:
    # the runtime checks them and refuses this mix, naming a file; with this compile's hashes it opens.
    if before.hashes != now.hashes:
        with pytest.raises(ArtifactError, match="does not match its sha256"):
            Runtime(old)
        (old / "manifest.json").write_text(json.dumps({**json.loads(FORMAT_1.read_text()), "hashes": now.hashes}))
    rt = Runtime(old)
    assert (rt.batch_size, rt.prefill_seq_len, rt.ctx_len) == (2, PREFILL, CTX)
    assert rt.generate(PROMPTS, max_new_tokens=6).tokens == Runtime(artifact).generate(PROMPTS, max_new_tokens=6).tokens
    (old / "manifest.json").write_text(json.dumps({**json.loads(FORMAT_1.read_text()), "format": 3}))
    with pytest.raises(ArtifactError, match="has format 3, this qgraph reads 2 \\(and converts 1\\); recompile the artifact"):
        Manifest.load(old)
