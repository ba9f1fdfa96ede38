"""Model families read their configs into a ModelSpec; nothing else reads config fields."""

from __future__ import annotations

import pytest

from qgraph.errors import ModelSourceError, OptionError
from qgraph.frontend.families import FAMILIES, random_family, random_shapes, spec_of

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
             vocab_size=120, max_position_embeddings=200)  # fmt: skip
CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig", "phi3": "Phi3Config", "gemma": "GemmaConfig"}


def config(family: str, **overrides: object) -> object:
    fields = {**SMALL, "sliding_window": None, **overrides}
    if family == "phi3":
        fields["pad_token_id"] = 0  # Phi3Config's default pad id lies outside a small vocabulary
    return getattr(transformers, CONFIGS[family])(**fields)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_each_llama_style_family_reads_its_shape(family: str) -> None:
    spec = spec_of(config(family, head_dim=16))
    assert (spec.family, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.hidden_size) == (family, 3, 8, 2, 64)
    assert (spec.head_dim, spec.vocab_size, spec.max_positions, spec.sliding_window) == (16, 120, 200, None)
    assert set(FAMILIES[family].MODEL_TYPES) == {family}


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    cfg = config("llama")
    cfg.head_dim = None
    assert spec_of(cfg).head_dim == 8


def test_heads_must_be_a_multiple_of_the_kv_heads() -> None:
    with pytest.raises(ModelSourceError, match="8 attention heads and 3 KV heads"):
        spec_of(config("llama", num_key_value_heads=3))


def test_a_sliding_window_caps_the_positions() -> None:
    assert spec_of(config("mistral", sliding_window=64)).max_positions == 64
    assert spec_of(config("mistral", sliding_window=64)).sliding_window == 64
    assert spec_of(config("mistral", sliding_window=500)).max_positions == 200
    # Qwen2 applies its window only when use_sliding_window is set, and then only to layers from max_window_layers on
    assert spec_of(config("qwen2", sliding_window=64, use_sliding_window=False, max_window_layers=1)).sliding_window is None
    assert spec_of(config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=2)).max_positions == 64
    for full in (3, 28):  # every layer full (28: Qwen2Config's default)
        assert spec_of(config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=full)).sliding_window is None
    cfg = config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=1)
    cfg.layer_types = None  # transformers without layer_types: max_window_layers alone
    assert spec_of(cfg).sliding_window == 64
    cfg.max_window_layers = 3
    assert spec_of(cfg).sliding_window is None


def test_a_ctx_len_longer_than_the_window_is_refused_in_one_line(tmp_path) -> None:
    from qgraph.api import AutoModelForCausalLM

    config("mistral", sliding_window=48).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.options(ctx_len=48).ctx_len == 48
    with pytest.raises(OptionError, match="sliding attention window 48") as e:
        model.options(ctx_len=49)
    assert "\n" not in str(e.value)


def test_random_llama_is_the_speed_target_shape() -> None:
    assert "llama" in random_shapes()
    family, shape = random_family("llama")  # type: ignore[misc]
    assert family is FAMILIES["llama"]
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_key_value_heads"], shape["vocab_size"]) == (768, 12, 4, 32000)
