"""The onnxruntime-genai contender: its model builder's graph and its own generation loop, at its best settings.

`onnxruntime-genai <https://pypi.org/project/onnxruntime-genai/>`_ (``pip install -e ".[bench]"``) builds a Llama-family
Hugging Face folder into its own ONNX graph (GroupQueryAttention, a KV cache shared between past and present, weights
as MatMulNBits at int4/int8) with ``python -m onnxruntime_genai.models.builder``, and runs it with its C++ generation
loop. The builder needs a ``tokenizer.json`` in the folder; random models have none, so the bench writes a word-level
one (:func:`write_word_tokenizer`): the loop here feeds token ids and never reads text, so any tokenizer of the
model's vocabulary size does.

Settings: greedy, the bench's thread count, no early stop (``min_length`` = ``max_length``: EOS never ends the
row), the builder's CPU defaults (accuracy level 4, symmetric) with the bench's block size.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError

#: Families (``ModelSpec.family``) onnxruntime-genai's builder takes.
GENAI_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")
#: The builder's ``-p`` for each precision of the bench.
PRECISIONS = ("fp32", "int4", "int8")


def genai_missing() -> str | None:
    """Why the genai contender cannot run here, or None."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return 'onnxruntime-genai: not installed (pip install -e ".[bench]")'
    return None


def write_word_tokenizer(folder: str | Path, vocab_size: int) -> Path:
    """A word-level ``tokenizer.json`` (and its ``tokenizer_config.json``) of ``vocab_size`` tokens ``t0``, ``t1``, ...
    in ``folder``, for models without one (random weights); returns the tokenizer's path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"}))
    return path


def build(folder: str | Path, out: str | Path, precision: str, *, block_size: int = 32, cache: str | Path | None = None) -> Path:
    """Build ``folder`` (a Hugging Face model folder with a tokenizer.json) with onnxruntime-genai's builder for the
    CPU at ``precision`` (fp32, int4 or int8) into ``out``; reused when ``out`` already holds a build."""
    folder, out = Path(folder), Path(out)
    if precision not in PRECISIONS:
        raise QGraphError(f"onnxruntime-genai precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if (out / "genai_config.json").is_file():
        return out
    if not (folder / "tokenizer.json").is_file():
        raise QGraphError(f"onnxruntime-genai's builder needs a tokenizer.json in {folder}; add the model's tokenizer there")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", precision, "-e", "cpu",
           "-c", str(cache or out.parent / "genai-cache")]  # fmt: skip
    if precision != "fp32":
        cmd += ["--extra_options", f"block_size={block_size}", "accuracy_level=4"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QGraphError(f"onnxruntime-genai's builder failed on {folder} ({precision}): {tail[0]}")
    return out


class GenaiRunner:
    """A built genai model loaded once with ``threads`` intra-op threads; :meth:`run` times one greedy generation."""

    def __init__(self, built: str | Path, threads: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(built))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model: Any = og.Model(config)

    def run(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        """(time to first token, seconds of the other ``n - 1`` tokens, the ``n`` greedy tokens) for ``prompt``."""
        og = self._og
        params = og.GeneratorParams(self.model)
        length = len(prompt) + n
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)  # the prefill
        gen.generate_next_token()  # picks the first token from the prefill's logits
        toks = [int(gen.get_next_tokens()[0])]
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()  # one decode step on the previous token, then the pick
            toks.append(int(gen.get_next_tokens()[0]))
        return ttft, time.perf_counter() - t1, toks
