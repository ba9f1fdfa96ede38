"""Small builders shared by the tests: random-weight models, an ONNX Runtime runner, the tools' modules.

Everything here is offline and tiny, so a test can build what it needs in
well under a second.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as module ``name`` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


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


def ort_run(path: str | Path, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX file once on the CPU; returns every output (or ``outputs``) by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the test machine's cores are shared
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))
