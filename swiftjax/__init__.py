"""swiftjax: rewards read from a language model's own hidden states, in JAX.

Methods, one folder each under ``swiftjax.methods``: SWIFT (``swift``), EBRM (``ebrm``),
GenARM (``genarm``), IRFT/RFT and DPO/MRPO (``preference``). Under them: Flax NNX ports of
Hugging Face causal LMs (``swiftjax.models``), the one sampler (``swiftjax.sampling``), a
Backbone (any HF directory with its tokenizer and chat template, ``swiftjax.backbone``) and
Tasks (world, GSM8K, MATH-500, any jsonl: ``swiftjax.tasks``), Best-of-N (``swiftjax.bon``).

Top-level names: :func:`load_model`, :func:`generate`, :class:`SamplingConfig`,
:class:`Backbone`, :func:`load_backbone` (imported on first use, so ``import swiftjax`` is cheap).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "generate": ("swiftjax.sampling", "generate"),
    "SamplingConfig": ("swiftjax.sampling", "SamplingConfig"),
    "GenerateOutput": ("swiftjax.sampling", "GenerateOutput"),
    "Backbone": ("swiftjax.backbone", "Backbone"),
    "load_backbone": ("swiftjax.backbone", "load_backbone"),
}


def load_model(path, dtype=None, **kwargs):
    """Load a local Hugging Face causal-LM directory; see :func:`swiftjax.models.load.load_model`."""
    from swiftjax.models.load import load_model as _load

    if dtype is None:
        return _load(path, **kwargs)
    return _load(path, dtype=dtype, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'swiftjax' has no attribute {name!r}")


__all__ = ["load_model", "__version__", *_LAZY]
