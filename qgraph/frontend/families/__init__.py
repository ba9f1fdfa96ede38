"""Model families: one module per family owns what is specific to it.

A family module reads its ``transformers`` config into a :class:`ModelSpec`
(layers, heads, head size, positions, vocabulary, EOS ids; the EOS ids from
generation_config.json where the model has one, as Hugging Face's generate
reads them) and holds whatever else export, the API and the bench need to
know about that architecture (the random-weight shapes of the bench, the
weights a decode step does not read).
Nothing outside the family modules reads config fields: everything else
receives a :class:`ModelSpec`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from qgraph.errors import ModelSourceError
from qgraph.frontend.families import gemma, gpt2, llama, mistral, phi3, qwen2
from qgraph.frontend.families.spec import ModelSpec

#: Family modules by ``config.model_type``.
FAMILIES: dict[str, ModuleType] = {t: m for m in (gpt2, llama, qwen2, mistral, phi3, gemma) for t in m.MODEL_TYPES}
#: Architectures qgraph can export and rewrite (``config.model_type``).
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(config: Any, name: str = "the model") -> ModuleType:
    """The family module of ``config``, or :class:`ModelSourceError` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        supported = ", ".join(repr(t) for t in SUPPORTED_MODEL_TYPES)
        raise ModelSourceError(f"{name} is a '{model_type}' model; qgraph supports these causal LMs (model_type): {supported}")
    return family


def spec_of(config: Any, name: str = "the model", generation_config: Any = None) -> ModelSpec:
    """What qgraph needs to know about a model, read from its config (and its generation_config.json,
    :func:`qgraph.frontend.hf.load_generation_config`, where it has one) by its family."""
    spec: ModelSpec = family_of(config, name).spec(config, generation_config)
    return spec


def random_family(shape: str) -> tuple[ModuleType, dict[str, int]] | None:
    """The family and config fields of a ``random:NAME`` shape (``gpt2``, ``gpt2-medium``, ...), or None."""
    for family in FAMILIES.values():
        if shape in family.RANDOM_SHAPES:
            return family, family.RANDOM_SHAPES[shape]
    return None


def random_shapes() -> list[str]:
    """Every ``random:NAME`` shape of every family."""
    return [name for family in dict.fromkeys(FAMILIES.values()) for name in family.RANDOM_SHAPES]


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "ModelSpec", "family_of", "random_family", "random_shapes", "spec_of"]
