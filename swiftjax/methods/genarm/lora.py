"""LoRA adapters for the model ports' :class:`~swiftjax.models.layers.Linear` modules.

:func:`apply_lora` swaps each targeted ``Linear`` (matched by attribute name, e.g.
``q_proj``) in place for a :class:`LoRALinear` that keeps the base weight (and bias)
*Variable objects* and adds two ``nnx.LoRAParam`` matrices::

    y = base(x) + (alpha / r) * dropout(x) @ A @ B,   A [in, r], B [r, out] (B = 0 at init)

so a freshly adapted model computes exactly what the base model computes. Train only the
adapters with ``loop.nnx_split(model, wrt=nnx.LoRAParam)`` (everything else, the base
weights included, goes to the frozen part); ``nnx.LoRAParam`` subclasses ``nnx.Param``,
so the default ``wrt=nnx.Param`` trains base weights and adapters together.
:func:`merge_lora` folds ``(alpha / r) * A @ B`` into the base weights (respecting the
``[out, in]`` / ``[in, out]`` layout) and puts plain ``Linear`` modules back, so
``save_model`` writes an ordinary HF checkpoint.

``models/layers.py`` is not modified: the swap is ``setattr`` on each target's parent.

Dropout on the adapter input (PEFT's ``lora_dropout``) is off unless a key is set: inside
a loss, wrap the function with :func:`with_lora_dropout` (or call
:func:`set_dropout_key` on the module rebuilt inside the traced step), which derives one
key per adapted layer from the step's ``rng``. Decoding and evaluation never see dropout.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from swiftjax.models.layers import Linear

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "apply_lora",
    "merge_lora",
    "lora_modules",
    "set_dropout_key",
    "with_lora_dropout",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "qkv_proj", "gate_up_proj")  # the last two: Phi-3's fused projections
_INITS = ("kaiming", "gaussian")


def _dims(lin: Linear) -> tuple[int, int]:
    """(in, out) of a Linear from its weight's layout."""
    shape = tuple(lin.weight.shape)
    return (shape[1], shape[0]) if lin.layout == "out_in" else (shape[0], shape[1])


class LoRALinear(Linear):
    """A :class:`Linear` with a low-rank update; built by :func:`apply_lora`.

    Attributes: ``weight`` / ``bias`` (the base module's own Variables), ``lora_a``
    ``[in, r]`` and ``lora_b`` ``[r, out]`` (``nnx.LoRAParam``), ``scale = alpha / r``,
    ``dropout`` (rate, applied to the adapter input only when ``dropout_key`` is set).
    """

    def __init__(self, base: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 dropout: float = 0.0, init: str = "kaiming"):
        din, dout = _dims(base)
        self.layout = base.layout
        self.dtype = base.dtype
        self.weight = base.weight
        self.bias = base.bias
        pdt = base.weight[...].dtype
        key = rngs.params()
        if init == "kaiming":
            # torch.nn.init.kaiming_uniform_(A, a=sqrt(5)) on PEFT's A [r, in]: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(din)
            a = jax.random.uniform(key, (din, rank), pdt, -bound, bound)
        else:  # PEFT's init_lora_weights="gaussian": normal(0, 1/r)
            a = jax.random.normal(key, (din, rank), pdt) / rank
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), pdt))
        self.rank = int(rank)
        self.scale = float(alpha) / float(rank)
        self.dropout = float(dropout)
        self.dropout_key = None

    def delta(self):
        """The dense update ``scale * A @ B`` as [in, out] float32."""
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))

    def __call__(self, x):
        y = super().__call__(x)
        h = x.astype(self.dtype)
        if self.dropout > 0.0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0.0).astype(h.dtype)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        return y + (self.scale * ((h @ a) @ b)).astype(y.dtype)


def _check_model(model) -> None:
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: expected an nnx.Module, got {type(model).__name__}")


def _targets(model, targets) -> list[tuple[tuple, Linear]]:
    """(path, module) of every Linear whose attribute name is in ``targets``."""
    found = []
    for path, mod in nnx.iter_modules(model):
        if path and isinstance(mod, Linear) and str(path[-1]) in targets:
            found.append((tuple(path), mod))
    return found


def _parent(model, path):
    node = model
    for p in path[:-1]:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _set(model, path, value) -> None:
    parent = _parent(model, path)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def lora_modules(model) -> list[tuple[tuple, LoRALinear]]:
    """(path, module) of every :class:`LoRALinear` in ``model``, in traversal order."""
    _check_model(model)
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def apply_lora(model, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, *,
               rngs: nnx.Rngs | int = 0, dropout: float = 0.0, init: str = "kaiming"):
    """Add LoRA adapters to ``model`` in place (and return it).

    Args:
      model: an NNX model whose linear layers are :class:`swiftjax.models.layers.Linear`.
      rank: r >= 1 (at most min(in, out) of every target).
      alpha: scaling numerator; the update is ``(alpha / r) * x @ A @ B``.
      targets: attribute names of the Linear modules to adapt (Llama default: attention
        and MLP projections; GPT-2 uses ``c_attn``, ``c_proj``, ``c_fc``).
      rngs: an ``nnx.Rngs`` or an int seed for A's initialisation.
      dropout: rate in [0, 1) on the adapter input during training (see module docs).
      init: ``'kaiming'`` (PEFT default: A ~ U(-1/sqrt(in), 1/sqrt(in))) or ``'gaussian'``
        (A ~ N(0, 1/r^2)); B starts at zero either way.
    Raises:
      ValueError for bad numbers, an already adapted model, or targets that match nothing.
    """
    _check_model(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if init not in _INITS:
        raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets: expected a non-empty sequence of module names, got {targets!r}")
    if lora_modules(model):
        raise ValueError("model: already has LoRA adapters (merge_lora it first)")
    if isinstance(rngs, int) and not isinstance(rngs, bool):
        rngs = nnx.Rngs(rngs)
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"rngs: expected nnx.Rngs or an int seed, got {type(rngs).__name__}")
    found = _targets(model, set(targets))
    if not found:
        names = sorted({str(p[-1]) for p, m in nnx.iter_modules(model) if p and isinstance(m, Linear)})
        raise ValueError(f"targets: {list(targets)} match no Linear module; the model has {names}")
    for path, lin in found:
        din, dout = _dims(lin)
        if rank > min(din, dout):
            raise ValueError(f"rank: expected <= min(in, out) = {min(din, dout)} for {'.'.join(map(str, path))}, "
                             f"got {rank}")
    for path, lin in found:
        _set(model, path, LoRALinear(lin, rank, alpha, rngs=rngs, dropout=dropout, init=init))
    return model


def merge_lora(model):
    """Fold every adapter into its base weight and restore plain ``Linear`` modules (in place;
    returns ``model``). ``W_out_in += scale * (A @ B).T``, ``W_in_out += scale * A @ B``,
    computed in float32 and cast back to the weight's dtype."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model: expected LoRA adapters to merge, found none")
    for path, lm in mods:
        din, dout = _dims(lm)
        w = lm.weight[...]
        d = lm.delta()
        w_new = (w.astype(jnp.float32) + (d.T if lm.layout == "out_in" else d)).astype(w.dtype)
        lin = nnx.eval_shape(lambda: Linear(din, dout, bias=lm.bias is not None, rngs=nnx.Rngs(0),
                                            layout=lm.layout, dtype=lm.dtype, param_dtype=w.dtype))
        lin.weight = nnx.Param(w_new)
        lin.bias = lm.bias
        _set(model, path, lin)
    return model


def set_dropout_key(model, key) -> None:
    """Set (``key``: a jax key) or clear (``None``) the adapter-dropout key of every
    :class:`LoRALinear` with ``dropout > 0``; layer ``i`` gets ``fold_in(key, i)``. Call it
    on the module rebuilt inside a traced loss (see :func:`with_lora_dropout`)."""
    for i, (_, m) in enumerate(lora_modules(model)):
        if m.dropout > 0.0:
            m.dropout_key = None if key is None else jax.random.fold_in(key, i)


def with_lora_dropout(fn: Callable) -> Callable:
    """Wrap ``fn(model, batch, rng) -> (loss, aux)`` so the adapters' dropout uses keys from
    ``rng`` (use with ``loop.nnx_loss``)."""

    def wrapped(model, batch, rng):
        if rng is not None:
            set_dropout_key(model, jax.random.fold_in(rng, 0x10A))
        return fn(model, batch, rng)

    return wrapped

