"""The options object: one default per option, resolved against the model, one message per rule."""

from __future__ import annotations

import pytest

from qgraph.errors import CompileError, GenerationError, OptionError
from qgraph.pipeline.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CTX_LEN,
    DEFAULT_PREFILL_SEQ_LEN,
    Options,
    check_at_least_one,
    check_prompts,
)
from qgraph.targets import TargetError, get_target


def test_defaults_are_resolved_against_the_model() -> None:
    opts = Options.resolve()
    assert (opts.ctx_len, opts.prefill_seq_len, opts.batch_size, opts.seq_len) == (
        DEFAULT_CTX_LEN,
        DEFAULT_PREFILL_SEQ_LEN,
        DEFAULT_BATCH_SIZE,
        None,
    )
    assert Options.resolve(max_positions=48).ctx_len == 48  # the default is capped by the model's maximum positions
    assert Options.resolve(max_positions=4096).ctx_len == DEFAULT_CTX_LEN
    assert Options.resolve(max_positions=48, cache_len=40).ctx_len == 40  # an already retained graph fixes it
    assert Options.resolve(max_positions=16).prefill_seq_len == 16  # a prompt chunk fits the cache
    assert Options.resolve(ctx_len=16).prefill_seq_len == 16
    asked = Options.resolve(ctx_len=64, prefill_seq_len=8, batch_size=2, max_positions=64)
    assert (asked.ctx_len, asked.prefill_seq_len, asked.batch_size) == (64, 8, 2)
    # A resolved object resolves to itself: resolving is idempotent, so handing it down changes nothing.
    assert Options.resolve(**{k: v for k, v in asked.to_dict().items() if k != "target_options"}, max_positions=64) == asked


def test_target_options_are_checked_and_filled_by_the_target() -> None:
    cpu = get_target("cpu")
    opts = Options.resolve(target_options={"threads": 2}, target=cpu)
    assert opts.target_options == {**cpu.defaults, "threads": 2}
    with pytest.raises(TargetError, match="unknown option"):
        Options.resolve(target_options={"soc_model": 60}, target=cpu)


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (dict(ctx_len=0), "ctx_len must be at least 1, got 0; pass --ctx-len 1 or more"),
        (dict(prefill_seq_len=0), "the prefill length must be at least 1, got 0; pass --prefill-seq-len 1 or more"),
        (dict(batch_size=-1), "the batch size must be at least 1, got -1; pass --batch-size 1 or more"),
        (dict(seq_len=0), "seq_len must be at least 1, got 0; pass --seq-len 1 or more"),
        (dict(ctx_len=64, max_positions=48), "ctx_len 64 is larger than the model's maximum length 48; use --ctx-len 48 or less"),
        (dict(ctx_len=16, prefill_seq_len=32), "the prefill length 32 is larger than ctx_len 16; use --prefill-seq-len 16 or less"),
    ],
)
def test_each_rule_has_one_message(asked: dict[str, int], message: str) -> None:
    with pytest.raises(OptionError) as e:
        Options.resolve(**asked)
    assert message in str(e.value)
    # Callers that caught the error their entry point raised before (compile, generate) still catch it.
    assert isinstance(e.value, CompileError) and isinstance(e.value, GenerationError)


def test_a_retained_graphs_cache_must_agree() -> None:
    Options.resolve(ctx_len=40).check_cache_len(40)
    with pytest.raises(OptionError, match="the graph's cache holds 32 tokens but ctx_len 40 was asked; re-optimize with --ctx-len 40"):
        Options.resolve(ctx_len=40).check_cache_len(32)


def test_prompt_and_generate_rules() -> None:
    check_prompts([[1, 2], "text"], None)
    check_prompts([[1, 2, 3]], 4)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        check_prompts(["hi", ""], None)
    with pytest.raises(GenerationError, match="prompt 0 has 4 tokens, which leaves no room to generate in ctx_len 4"):
        check_prompts([[1, 2, 3, 4]], 4)
    with pytest.raises(GenerationError, match="max_new_tokens must be at least 1, got 0"):
        check_at_least_one("max_new_tokens", 0)
    # The API's wrong types, one line each (they were TypeErrors from deep inside, or 2.5 ran as 3 tokens).
    for value in (2.5, "3"):
        with pytest.raises(GenerationError, match=f"max_new_tokens must be an integer, got {value!r}"):
            check_at_least_one("max_new_tokens", value)  # type: ignore[arg-type]
    for prompts in ([1, 5, 6], [None]):
        with pytest.raises(GenerationError, match=r"prompt 0 is .*: a prompt is a text or a list of token ids \(input_ids=\[\[1, 2, 3\]\]"):
            check_prompts(prompts, None)  # type: ignore[arg-type]


def test_the_manifest_form_round_trips_without_the_pin_width() -> None:
    opts = Options.resolve(ctx_len=48, prefill_seq_len=8, batch_size=2, target_options={"threads": None}, target=get_target("cpu"))
    data = opts.to_dict()
    assert set(data) == {"ctx_len", "prefill_seq_len", "batch_size", "target_options", "quantize", "quant_block_size", "quant_vocab"}
    assert Options.from_dict(data) == opts
    quantized = Options.resolve(quantize="int4", quant_block_size=64, target=get_target("cpu"))
    assert Options.from_dict(quantized.to_dict()) == quantized and quantized.weight_only
    old = {k: v for k, v in data.items() if not k.startswith("quant")}  # a manifest from before quantization
    assert Options.from_dict(old) == opts and opts.quantize is None
    assert quantized.quant_vocab == "int4-rescore"  # the default under int4: int4, its candidates rescored in int8
    assert Options.resolve(quantize="int8", target=get_target("cpu")).quant_vocab == "int8"
    # A manifest from before --quant-vocab quantized the vocabulary in the mode itself.
    before = {k: v for k, v in quantized.to_dict().items() if k != "quant_vocab"}
    assert Options.from_dict(before).quant_vocab == "int4"


@pytest.mark.parametrize(
    ("asked", "target", "message"),
    [
        (dict(quantize="int3"), "cpu", "unknown --quantize 'int3'; use one of int8, int4, w8a16"),
        (dict(quantize="w8a16"), "cpu", "--quantize w8a16 is for qnn, not --target cpu; use --quantize int8 or int4 there"),
        (dict(quantize="w8a16"), None, "--quantize w8a16 is for qnn, not a graph without a target (qgraph optimize); use --quantize "
                                       "int8 or int4 there"),
        (dict(quantize="int4"), "qnn", "--quantize int4 is for optimize or cpu, not --target qnn; use --quantize w8a16 there"),
        (dict(quantize="int8"), "qaic", "--quantize int8 is for optimize or cpu, not --target qaic; drop --quantize (qaic quantizes "
                                        "with --mxfp6-matmul)"),
        (dict(quantize="int4", quant_block_size=48), "cpu", "the quantization block size must be a power of two from 16 to 256, got 48"),
        (dict(quantize="int8", quant_block_size=8), None, "the quantization block size must be a power of two from 16 to 256, got 8"),
        (dict(quantize="int4", quant_block_size=512), "cpu", "the quantization block size must be a power of two from 16 to 256, got 512"),
        (dict(quant_block_size=64), "cpu", "--quant-block-size goes with --quantize; add --quantize int8 or int4, or drop it"),
        (dict(quant_block_size=64, quant_vocab="int4"), None, "--quant-block-size and --quant-vocab go with --quantize; add "
                                                              "--quantize int8 or int4, or drop them"),
    ],
)  # fmt: skip
def test_quantize_is_checked_against_the_target(asked: dict[str, object], target: str | None, message: str) -> None:
    with pytest.raises(OptionError) as e:
        Options.resolve(**asked, target=get_target(target) if target else None)  # type: ignore[arg-type]
    assert message in str(e.value)


def test_quantize_modes_each_target_takes() -> None:
    assert Options.resolve(quantize="int8").weight_only  # qgraph optimize: no target
    assert Options.resolve(quantize="int4", target=get_target("cpu")).quant_block_size == 32
    w8a16 = Options.resolve(quantize="w8a16", target=get_target("qnn"))
    assert w8a16.quantize == "w8a16" and not w8a16.weight_only  # QDQ for the NPU, not this pass's blocks
