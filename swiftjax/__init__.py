"""swiftjax: rewards read from a language model's own hidden states, in JAX.

Methods: SWIFT (``swiftjax.swift``), EBRM (``swiftjax.ebrm``), GenARM
(``swiftjax.arm``), IRFT/RFT and MRPO (``swiftjax.preference``), Best-of-N
(``swiftjax.bon``); under them Flax NNX ports of Hugging Face causal LMs
(``swiftjax.models``) and KV-cache decoding (``swiftjax.decode``).
"""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, dtype=None, **kwargs):
    """Load a local Hugging Face causal-LM directory; see :func:`swiftjax.models.load.load_model`."""
    from swiftjax.models.load import load_model as _load

    return _load(path, dtype=dtype, **kwargs)


__all__ = ["load_model", "__version__"]
