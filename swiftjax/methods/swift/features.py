"""SWIFT token features read from a model's forward, and the fused head that never builds them.

What a forward yields for SWIFT (spec: docs/swift.md, "Features"):

* :class:`FeatureSpec` says which features: the residual states of a subset of the L+1 hidden
  states (Hugging Face convention: 0 = embedding output, i < L after block i, L = after the final
  norm), optionally passed through the final norm (``apply_norm``; state L is then normed twice,
  as in the reference), concatenated in index order (F = |layers| * d_model); or a logits mode
  (``'logits'``: the full output logit vector, F = V; ``'topk'`` / ``'topk_logprobs'``: the k
  largest logits / log-probs, F = k, see :func:`swiftjax.methods.swift.head.logits_features`).
* :func:`extract` -> ``[B, T, F]`` float32 for one batch (only the selected states are
  materialised: the forward sows them and nothing else leaves the jitted function);
  :func:`iter_feature_batches` streams a whole candidate set in length-sorted batches, each
  cut to the columns its rows use (a few bucketed widths compile; no work on padding);
  :func:`response_rows` / :func:`pad_rows` convert between padded batches and
  the ragged response-token rows a feature store holds; :func:`write_store` streams a set into
  a :class:`swiftjax.data.store.FeatureStoreWriter`.
* :func:`fused_scores` folds the head into the forward: the model is given ``projections={l:
  W_l}`` (the kernel's per-layer row blocks, :func:`swiftjax.methods.swift.head.split_kernel`) and sows
  ``h_l @ W_l`` [B, T, C] per selected layer, so scoring holds O(T * C) per layer, never
  ``[T, F]``. In ``'logits'`` mode the head folds through the (affine) unembedding:
  ``logits @ W = h_L @ (U @ W)``. :func:`fused_scores_batched` scores a whole set.
* :func:`generate_with_scores` samples like :func:`swiftjax.sampling.generate` (same tokens for
  the same key and config) and reads ``(u_t, r_t)`` from each step's forward, so the running
  score of every partial response is known during decoding.

The response mask marks the tokens that count (every token of the assistant turn, its
end-of-turn token included); :func:`extract` zeroes the features elsewhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax import parallel
from swiftjax.methods.swift import head as swift
from swiftjax.methods.swift.prune import drop_lowest
from swiftjax._checks import check_int, check_rank, check_same_shape
from swiftjax.batching import length_batches, prompt_batches, row_spans, take
from swiftjax.sampling import LMDecoder, SamplingConfig, check_ids_in_vocab, constrain_cache, run_sampler
from swiftjax.models.cache import init_cache
from swiftjax.models.config import ModelConfig
from swiftjax.models.transformer import HiddenState, LayerProjection, Taps

__all__ = [
    "MODES",
    "FeatureSpec",
    "resolve_layers",
    "feature_dim",
    "extract",
    "FeatureBatch",
    "iter_feature_batches",
    "response_rows",
    "pad_rows",
    "write_store",
    "write_stores",
    "extract_many",
    "fold_head",
    "fused_projections",
    "fused_scores",
    "fused_scores_batched",
    "fused_scores_many",
    "ScoredGeneration",
    "generate_with_scores",
]

MODES = ("hidden", "logits", "topk", "topk_logprobs", "token_logprobs")
_LOGITS_MODE = {"logits": "full", "topk": "topk", "topk_logprobs": "topk_logprobs"}


# ----------------------------------------------------------------------------- spec


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which token features a forward yields.

    layers: ``'all'`` (the L+1 hidden states) or a non-empty tuple of distinct HF hidden-state
      indices in [0, L]; features concatenate them in increasing index order whatever the order
      given. Used by mode ``'hidden'`` only.
    apply_norm: pass every selected state through the model's final norm (mode ``'hidden'``).
    mode: ``'hidden'`` | ``'logits'`` (full vocabulary) | ``'topk'`` | ``'topk_logprobs'`` |
      ``'token_logprobs'`` (ours: the log-prob the model gave each response token, the entropy
      of the distribution it was drawn from, and that distribution's k largest log-probs).
    k: the number of logits kept by the top-k modes (None otherwise; 'token_logprobs': k >= 0).
    """

    layers: tuple[int, ...] | str = "all"
    apply_norm: bool = False
    mode: str = "hidden"
    k: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"FeatureSpec.mode: expected one of {MODES}, got {self.mode!r}")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(
                    f"FeatureSpec.layers: expected 'all' or a tuple of layer indices, got {self.layers!r}"
                )
        else:
            try:
                layers = tuple(self.layers)
            except TypeError:
                raise ValueError(
                    f"FeatureSpec.layers: expected 'all' or a tuple of layer indices, got {self.layers!r}"
                ) from None
            if not layers or not all(_is_int(i) and i >= 0 for i in layers):
                raise ValueError(
                    f"FeatureSpec.layers: expected a non-empty tuple of ints >= 0, got {self.layers!r}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"FeatureSpec.layers: expected distinct indices, got {layers}")
            object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        if not isinstance(self.apply_norm, (bool, np.bool_)):
            raise ValueError(f"FeatureSpec.apply_norm: expected a bool, got {self.apply_norm!r}")
        object.__setattr__(self, "apply_norm", bool(self.apply_norm))
        if self.mode in ("topk", "topk_logprobs"):
            if not _is_int(self.k) or self.k < 1:
                raise ValueError(f"FeatureSpec.k: expected an int >= 1 for mode {self.mode!r}, got {self.k!r}")
            object.__setattr__(self, "k", int(self.k))
        elif self.mode == "token_logprobs":
            k = 0 if self.k is None else self.k
            if not _is_int(k) or k < 0:
                raise ValueError(f"FeatureSpec.k: expected an int >= 0 or None for mode 'token_logprobs', got {self.k!r}")
            object.__setattr__(self, "k", int(k))
        elif self.k is not None:
            raise ValueError(f"FeatureSpec.k: expected None for mode {self.mode!r}, got {self.k!r}")

    def to_dict(self) -> dict:
        """JSON-ready form (the feature store's manifest keeps it)."""
        layers = self.layers if isinstance(self.layers, str) else list(self.layers)
        return {"layers": layers, "apply_norm": self.apply_norm, "mode": self.mode, "k": self.k}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        if not isinstance(d, Mapping):
            raise ValueError(f"FeatureSpec.from_dict: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"layers", "apply_norm", "mode", "k"})
        if unknown:
            raise ValueError(f"FeatureSpec.from_dict: unknown keys {unknown}")
        layers = d.get("layers", "all")
        return cls(layers=layers if isinstance(layers, str) else tuple(layers),
                   apply_norm=d.get("apply_norm", False), mode=d.get("mode", "hidden"), k=d.get("k"))


def _check_spec(spec) -> FeatureSpec:
    if not isinstance(spec, FeatureSpec):
        raise ValueError(f"spec: expected a FeatureSpec, got {type(spec).__name__}")
    return spec


def resolve_layers(spec: FeatureSpec, num_layers: int) -> tuple[int, ...]:
    """The hidden-state indices a ``'hidden'`` spec reads, sorted: 'all' -> (0, ..., L).

    num_layers: L, the model's number of blocks (so L + 1 states). Raises for logits modes
    (they read no hidden states) and for indices outside [0, L].
    """
    _check_spec(spec)
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
    if spec.mode != "hidden":
        raise ValueError(f"resolve_layers: mode {spec.mode!r} reads no hidden-state layers (expected 'hidden')")
    if spec.layers == "all":
        return tuple(range(num_layers + 1))
    bad = [i for i in spec.layers if i > num_layers]
    if bad:
        raise ValueError(
            f"FeatureSpec.layers: expected indices in [0, {num_layers}] (L+1 hidden states), got {bad}"
        )
    return tuple(sorted(spec.layers))


def feature_dim(spec: FeatureSpec, cfg: ModelConfig) -> int:
    """F: |layers| * d_model (hidden), V (logits) or k (top-k modes)."""
    _check_spec(spec)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    if spec.mode == "hidden":
        return len(resolve_layers(spec, cfg.num_layers)) * cfg.hidden_size
    if spec.mode == "logits":
        return cfg.vocab_size
    if spec.mode == "token_logprobs":
        if spec.k > cfg.vocab_size:
            raise ValueError(f"FeatureSpec.k: expected <= vocab size {cfg.vocab_size}, got {spec.k}")
        return 2 + spec.k
    if spec.k > cfg.vocab_size:
        raise ValueError(f"FeatureSpec.k: expected <= vocab size {cfg.vocab_size}, got {spec.k}")
    return spec.k


# ----------------------------------------------------------------------------- inputs


def _model_cfg(model) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"model: expected a swiftjax decoder LM (with a ModelConfig .config), got {type(model).__name__}")
    return cfg


def _check_batch(ids, attention_mask, response_mask, vocab_size: int):
    """Validate ids / masks [B, T] (ids in [0, vocab_size) where attention_mask is 1) and
    return them as numpy (int32, int32, float32)."""
    ids = np.asarray(ids)
    check_rank(ids, "ids", 2, "[B, T]")
    check_int(ids, "ids")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"ids: expected a non-empty [B, T] batch, got shape {ids.shape}")
    attn = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    check_same_shape(ids, attn, "ids", "attention_mask")
    resp = np.asarray(response_mask)
    check_same_shape(ids, resp, "ids", "response_mask")
    for name, m in (("attention_mask", attn), ("response_mask", resp)):
        if not np.all((m == 0) | (m == 1)):
            raise ValueError(f"{name}: expected 0/1 values, got values {np.unique(m)[:5]}")
    if np.any((resp > 0) & (attn == 0)):
        raise ValueError("response_mask: expected response tokens to be real tokens (attention_mask 1), "
                         "found a response position with attention_mask 0")
    check_ids_in_vocab(ids, attn, vocab_size, "ids")
    return ids.astype(np.int32), attn.astype(np.int32), resp.astype(np.float32)


def _check_head(params, spec: FeatureSpec, cfg: ModelConfig) -> int:
    swift.num_params(params)  # validates the head pytree
    f = feature_dim(spec, cfg)
    got = int(np.shape(params["kernel"])[0])
    if got != f:
        raise ValueError(
            f"params['kernel']: expected {f} rows (feature_dim of {spec} on this model), got {got}"
        )
    return int(np.shape(params["kernel"])[1])


# ----------------------------------------------------------------------------- extraction


def _features_many(model, ids, attn, resp, specs, layers_each):
    """Traced body of :func:`extract_many`: one forward, a tuple of [B, T, F_s] float32 (one per
    spec), zero outside the response mask. The forward sows the raw states of the union of the
    hidden specs' layers (the final norm is applied per spec afterwards, the same function the
    forward would apply) and computes the logits only when a logits-mode spec needs them."""
    states, logits = _sown(model, ids, attn, specs, layers_each)
    return _features_from(model, states, logits, ids, resp, specs, layers_each)


def _features_from(model, states, logits, ids, resp, specs, layers_each, first=None):
    """Traced: the per-spec features of one forward's sown states / logits (``first``: the logits
    before ``ids[:, 0]`` when the batch continues a prefilled prompt, else None)."""
    outs = []
    logits, first = _stats(logits, model, ids, specs), _stats(first)
    for spec, layers in zip(specs, layers_each):
        if spec.mode == "hidden":
            x = jnp.concatenate([_tap(model, states[i], spec.apply_norm) for i in layers], axis=-1)
        else:
            x = _logit_feats(logits, ids, spec, first)
        outs.append(jnp.where(resp[..., None] > 0, x, 0.0))
    return tuple(outs)


def _needs_logits(specs) -> bool:
    return any(s.mode != "hidden" for s in specs)


def _sown(model, ids, attn, specs, layers_each, cache=None):
    """Traced: one forward (on ``cache`` when given) -> ({i: raw state [B, T, D]} for the union
    of the hidden specs' layers, the logits or None when no spec reads them).

    The logits are [B, T, V] only when a spec reads them whole (mode 'logits'); otherwise they
    are a :class:`_FinalState` (the final normed state [B, T, D]) from which :func:`_stats`
    computes every per-position statistic the specs read in chunks of positions, never holding
    [B, T, V]: on a 152k vocabulary those temporaries cost more than the projection itself."""
    hidden = {i for s, ls in zip(specs, layers_each) if s.mode == "hidden" for i in ls}
    need_logits = _needs_logits(specs)
    whole = any(s.mode == "logits" for s in specs)
    last = model.config.num_layers
    taps = sorted(hidden | ({last} if need_logits and not whole else set()))
    if not taps:
        return {}, model(ids, attn, cache=cache).logits if need_logits else None
    out, inter = nnx.capture(model, HiddenState)(ids, attn, cache=cache, taps=Taps(layers=tuple(taps)),
                                                 compute_logits=whole)
    flat = nnx.to_pure_dict(inter)
    states = {i: flat[f"state_{i:03d}"][0] for i in taps}
    if need_logits and not whole:
        return {i: states[i] for i in hidden}, _FinalState(states[last])
    return states, out.logits


def _prefill_shared(model, prompt_ids, prompt_mask, rows: int, width: int, need_logits: bool):
    """Traced: one prompt [1, P] (left-padded) prefilled into a cache of ``P + width`` slots and
    repeated to ``rows`` rows -> (cache, the prompt's last logits [rows, 1, V] or None). The
    responses then run on that cache: the prompt is computed once for all of them."""
    c = init_cache(model.config, 1, prompt_ids.shape[1] + width, jnp.float32)
    o = model(prompt_ids, prompt_mask, cache=c, compute_logits=need_logits, last_only=True)
    cache = constrain_cache(jax.tree.map(lambda x: jnp.repeat(x, rows, axis=0) if x.ndim else x, o.cache))
    return cache, (jnp.repeat(o.logits, rows, axis=0) if need_logits else None)


def _sown_shared(model, prompt_ids, prompt_mask, ids, attn, specs, layers_each):
    """Traced :func:`_sown` of responses [b, W] that continue one shared prompt [1, P]:
    (states, logits, the prompt's last logits or None)."""
    cache, first = _prefill_shared(model, prompt_ids, prompt_mask, ids.shape[0], ids.shape[1],
                                   _needs_logits(specs))
    states, logits = _sown(model, ids, attn, specs, layers_each, cache=cache)
    return states, logits, first


def _tap(model, h, apply_norm: bool):
    """A sown raw state as a float32 feature block (through the final norm when asked)."""
    return (model.final_norm(h) if apply_norm else h).astype(jnp.float32)


class _LogitStats:
    """Traced per-position statistics of one forward's logits [B, T, V], each computed once for
    every spec that reads them (one pass of exp over the vocabulary for the log-normaliser and
    the entropy together; one top-k per k)."""

    def __init__(self, logits):
        self.logits = logits.astype(jnp.float32)
        self._lse = self._ent = None
        self._top = {}

    def lse(self):
        """log sum exp [B, T]."""
        if self._lse is None:
            self._lse = jax.nn.logsumexp(self.logits, axis=-1)
        return self._lse

    def lse_entropy(self):
        """(log sum exp, entropy of the softmax) [B, T], from one exp pass (:func:`_lse_entropy`)."""
        if self._ent is None:
            v = self.logits.shape[-1]
            lse, ent = _lse_entropy(self.logits.reshape(-1, v))
            self._lse, self._ent = lse.reshape(self.logits.shape[:-1]), ent.reshape(self.logits.shape[:-1])
        return self._lse, self._ent

    def next_logit(self, ids):
        """[B, T]: the logit of ``ids[:, t + 1]`` at position t (the last position reads id 0)."""
        return jnp.take_along_axis(self.logits, _next_ids(ids)[..., None], axis=-1)[..., 0]

    def topk(self, k: int):
        """The k largest logits [B, T, k], sorted. One top-k per k: slicing a shared larger
        top-k looks cheaper, but XLA:CPU then lowers it to a full sort of the vocabulary
        (measured 25x slower on Qwen's 151,936 logits)."""
        if k not in self._top:
            self._top[k] = jax.lax.top_k(self.logits, k)[0]
        return self._top[k]


class _FinalState(NamedTuple):
    """The final normed state [B, T, D] standing in for the logits it projects to."""

    h: jax.Array


LOGIT_CHUNK = 256  # positions (rows x columns) per chunk of the chunked logit statistics


class _ChunkedLogitStats:
    """The statistics of :class:`_LogitStats` (log-normaliser, entropy, top-k per k, and the
    logit of each position's next token) computed from the final state [B, T, D] in chunks of
    ``LOGIT_CHUNK // B`` columns of every row: each chunk projects to its logits and reduces them,
    so no [B, T, V] array (nor its shifted / exponentiated copies) is ever held. Same formulas,
    position by position, as :class:`_LogitStats`."""

    def __init__(self, model, h, ids, ks: Sequence[int]):
        b, t, d = h.shape
        c = max(1, min(t, LOGIT_CHUNK // b))   # columns per chunk: ~LOGIT_CHUNK positions, all rows
        pad = (-t) % c
        # [chunks, B, c, ...]: the rows stay whole in every chunk (their sharding along 'data' too)
        hc_all = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).transpose(1, 0, 2, 3)
        nc_all = jnp.pad(_next_ids(ids), ((0, 0), (0, pad))).reshape(b, -1, c).transpose(1, 0, 2)
        ks = tuple(sorted(set(ks)))

        def one(args):
            hc, nc = args
            lg = model.logits(hc).reshape(b * c, -1)                        # [B * c, V]
            tok = jnp.take_along_axis(lg, nc.reshape(-1, 1), axis=-1)[:, 0]
            out = (*_lse_entropy(lg), tok, _top_values(lg, ks))
            return jax.tree.map(lambda x: x.reshape((b, c) + x.shape[1:]), out)

        lse, ent, tok, tops = jax.lax.map(one, (hc_all, nc_all))

        def back(x):  # [chunks, B, c, ...] -> [B, T, ...]
            x = jnp.moveaxis(x, 0, 1)
            return x.reshape((b, -1) + x.shape[3:])[:, :t]

        self._lse, self._ent, self._tok = back(lse), back(ent), back(tok)
        self._top = {k: back(x) for k, x in zip(ks, tops)}
        self._ids = ids

    def lse(self):
        return self._lse

    def lse_entropy(self):
        return self._lse, self._ent

    def topk(self, k: int):
        if k not in self._top:
            raise ValueError(f"top-k: k={k} was not computed (computed: {sorted(self._top)})")
        return self._top[k]

    def next_logit(self, ids):
        """[B, T]: the logit of ``ids[:, t + 1]`` at position t (0 at the last position)."""
        if ids is not self._ids:
            raise ValueError("next_logit: expected the ids these statistics were computed for")
        return self._tok


SUM_BLOCK = 128  # inner block of the two-level row sums of _row_sums


def _row_sums(a, b):
    """(sum a, sum b) over the last axis of two [R, V] arrays in one pass.

    One variadic reduction instead of two: XLA:CPU turns ``sum(e * z)`` into a dot product
    that runs at half the speed of the exp pass itself. Summed in blocks of ``SUM_BLOCK``
    columns, then across blocks, so the float32 rounding stays that of a pairwise sum (a flat
    sequential reduction over 152k columns drifts by ~3e-4 relative)."""
    r, v = a.shape
    pad = (-v) % SUM_BLOCK
    if pad:  # zero columns add nothing to either sum
        a, b = jnp.pad(a, ((0, 0), (0, pad))), jnp.pad(b, ((0, 0), (0, pad)))
    zero = np.float32(0)
    sa, sb = jax.lax.reduce((a.reshape(r, -1, SUM_BLOCK), b.reshape(r, -1, SUM_BLOCK)), (zero, zero),
                            lambda x, y: (x[0] + y[0], x[1] + y[1]), (2,))
    return jnp.sum(sa, axis=-1), jnp.sum(sb, axis=-1)


def _lse_entropy(logits):
    """(log sum exp, entropy of the softmax) [R] of logits [R, V] from one exp pass: with
    z = l - max l, e = exp z, s = sum e: lse = max l + log s, entropy = log s - sum(e z) / s
    (both sums in one :func:`_row_sums` pass)."""
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    z = logits - m
    e = jnp.exp(z)
    tot, ez = _row_sums(e, e * z)
    log_s = jnp.log(tot)
    return m[:, 0] + log_s, log_s - ez / tot


def _top_values(x, ks: Sequence[int]) -> tuple:
    """The k largest values of ``x`` [R, V] for each k of ``ks`` (sorted, ascending ks): one
    top-k over V for the largest k, the smaller ones taken from it with a top-k of its own
    (the same values; slicing it instead makes XLA:CPU sort the whole vocabulary)."""
    if not ks:
        return ()
    big = jax.lax.top_k(x, ks[-1])[0]
    return tuple(big if k == ks[-1] else jax.lax.top_k(big, k)[0] for k in ks)


def _next_ids(ids):
    """ids shifted left by one position (0 after the last): the token each position predicts."""
    return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1).astype(jnp.int32)


def _spec_ks(specs) -> tuple[int, ...]:
    return tuple(s.k for s in specs if s.mode in ("token_logprobs", "topk", "topk_logprobs") and s.k)


def _stats(logits, model=None, ids=None, specs=()):
    """The shared statistics of one forward's logits: None, :class:`_LogitStats` over [B, T, V]
    logits, or :class:`_ChunkedLogitStats` from a :class:`_FinalState`."""
    if logits is None:
        return None
    if isinstance(logits, _FinalState):
        return _ChunkedLogitStats(model, logits.h, ids, _spec_ks(specs))
    return _LogitStats(logits)


def token_logprob_features(logits, ids, k: int = 0, first=None):
    """Per token t: [log p(ids[t] | ids[<t]), entropy of that distribution, its k largest
    log-probs (sorted)] -> [B, T, 2 + k] float32, read from the logits at t - 1; at t = 0 from
    ``first`` [B, 1, V] (the logits before ``ids[:, 0]``, when the batch continues a prefilled
    prompt), or zeros when None.

    A sampled mistake is a token the model itself found unlikely; a linear gate over these
    features can weight such tokens, which hidden states alone expose only bilinearly.
    Computed per position on the logits as they are (no shifted or normalised [B, T, V] copy):
    the features of position t describe token t + 1, then shift by one."""
    st = logits if isinstance(logits, (_LogitStats, _ChunkedLogitStats)) else _LogitStats(logits)
    cur = _position_feats(st, st.next_logit(ids), k)                     # [B, T, 2 + k] about token t + 1
    if first is None:
        head = jnp.zeros_like(cur[:, :1])
    else:
        fs = first if isinstance(first, _LogitStats) else _LogitStats(first)
        tok0 = jnp.take_along_axis(fs.logits, ids[:, :1, None].astype(jnp.int32), axis=-1)[..., 0]
        head = _position_feats(fs, tok0, k)
    return jnp.concatenate([head, cur[:, :-1]], axis=1)


def _position_feats(st, tok_logit, k: int):
    """[log p(token), entropy, top-k log-probs] of position t's distribution, given the logit of
    the token that follows it ``tok_logit`` [B, T] -> [B, T, 2 + k]."""
    lse, ent = st.lse_entropy()
    tok = tok_logit - lse
    parts = [tok[..., None], ent[..., None]]
    if k:
        parts.append(st.topk(k) - lse[..., None])
    return jnp.concatenate(parts, axis=-1)


def _logit_feats(logits, ids, spec: FeatureSpec, first=None):
    """Traced features of a logits-mode spec; ``logits`` / ``first`` are arrays or the
    :class:`_LogitStats` shared by every spec of the forward."""
    if spec.mode == "token_logprobs":
        return token_logprob_features(logits, ids, spec.k, first)
    if not isinstance(logits, (_LogitStats, _ChunkedLogitStats)):
        return swift.logits_features(logits, _LOGITS_MODE[spec.mode], spec.k)
    if spec.mode == "logits":
        return logits.logits
    if spec.mode == "topk":
        return logits.topk(spec.k)
    return logits.topk(spec.k) - logits.lse()[..., None]


def _split_rows(*xs):
    """[B, T] inputs split along the mesh's 'data' axis (no-op without a mesh)."""
    return tuple(parallel.constrain(x, "batch", None) for x in xs)


@functools.partial(jax.jit, static_argnames=("graphdef", "specs", "layers"))
def _extract_many(state, ids, attn, resp, *, graphdef, specs, layers):
    ids, attn, resp = _split_rows(ids, attn, resp)
    return _features_many(nnx.merge(graphdef, state), ids, attn, resp, specs, layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "specs", "layers"))
def _extract_many_shared(state, prompt_ids, prompt_mask, ids, attn, resp, *, graphdef, specs, layers):
    ids, attn, resp = _split_rows(ids, attn, resp)
    model = nnx.merge(graphdef, state)
    states, logits, first = _sown_shared(model, prompt_ids, prompt_mask, ids, attn, specs, layers)
    return _features_from(model, states, logits, ids, resp, specs, layers, first)


def _layers_or_empty(spec: FeatureSpec, cfg: ModelConfig) -> tuple[int, ...]:
    return resolve_layers(spec, cfg.num_layers) if spec.mode == "hidden" else ()


def extract(model, ids, attention_mask, response_mask, spec: FeatureSpec) -> jax.Array:
    """Token features of one teacher-forced batch.

    ids, attention_mask, response_mask: [B, T] (left or right padding; 1 = real / response
    token). Returns features [B, T, F] float32 (F = :func:`feature_dim`), zero at positions
    outside ``response_mask``. Jitted per (model structure, spec, shape).
    """
    return extract_many(model, ids, attention_mask, response_mask, (spec,))[0]


def _check_specs(specs, cfg: ModelConfig) -> tuple[tuple[FeatureSpec, ...], tuple[tuple[int, ...], ...]]:
    if isinstance(specs, FeatureSpec) or not isinstance(specs, Sequence) or not specs:
        raise ValueError(f"specs: expected a non-empty sequence of FeatureSpec, got {specs!r}")
    specs = tuple(_check_spec(s) for s in specs)
    for s in specs:
        feature_dim(s, cfg)
    return specs, tuple(_layers_or_empty(s, cfg) for s in specs)


def extract_many(model, ids, attention_mask, response_mask, specs: Sequence[FeatureSpec]) -> tuple[jax.Array, ...]:
    """The features of several specs from ONE forward: a tuple of [B, T, F_s] float32, equal to
    :func:`extract` per spec (all-layer raw states, a few normed subsets and the token
    log-probs cost one forward, not one each)."""
    cfg = _model_cfg(model)
    specs, layers = _check_specs(specs, cfg)
    ids, attn, resp = _check_batch(ids, attention_mask, response_mask, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    return _extract_many(state, ids, attn, resp, graphdef=graphdef, specs=specs, layers=layers)


class FeatureBatch(NamedTuple):
    """One batch of a candidate set, cut to the columns its rows use.

    rows: [b] int64 row indices into the set, -1 on padding rows (a window's last batch is
      padded);
    features: [b, W, F] float32 (zero outside the response mask) over columns
      ``[start, start + W)`` of the set's [N, T] arrays (W <= T);
    mask: [b, W] float32 response mask over the same columns (all zero on padding rows);
    start: the first column.
    """

    rows: np.ndarray
    features: jax.Array
    mask: np.ndarray
    start: int = 0


def _check_batch_size(batch_size) -> int:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return int(batch_size)


def _progress(it, total, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc)


def iter_feature_batches(model, ids, attention_mask, response_mask, spec: FeatureSpec,
                         batch_size: int = 32, *, bucket: int | None = 64, window: int | None = None,
                         progress: bool = False) -> Iterator[FeatureBatch]:
    """Stream the features of a whole candidate set, ``batch_size`` rows at a time.

    ids / masks: [N, T] host arrays. Batches come from :func:`swiftjax.batching.length_batches`:
    inside each window of ``window`` consecutive rows (None: the whole set) rows are sorted by
    length and every batch is cut to the columns its rows use, its width rounded up to a
    multiple of ``bucket`` (so at most ceil(T / bucket) shapes compile; ``bucket=None``: every
    batch in row order at full width, one compilation). The last batch of a window is padded
    with copies of a real row whose mask is zeroed. Yields :class:`FeatureBatch` (``rows`` says
    which rows, ``start`` which columns); only one batch of features is alive at a time if the
    caller drops it (streaming recomputation, or feeding a feature store).
    """
    for rows, feats, mask, start in _iter_many(model, ids, attention_mask, response_mask, (spec,), batch_size,
                                               bucket=bucket, window=window, progress=progress):
        yield FeatureBatch(rows=rows, features=feats[0], mask=mask, start=start)


def _iter_many(model, ids, attention_mask, response_mask, specs, batch_size, *, bucket, window, progress,
               share_prompts: bool = False):
    """:func:`iter_feature_batches` for several specs from one forward per batch: yields
    (rows, (features per spec), mask, start) (``start`` None for prompt-shared batches, whose
    columns are each row's response). Checks everything before the first forward."""
    cfg = _model_cfg(model)
    specs, layers = _check_specs(specs, cfg)
    batch_size = _check_batch_size(batch_size)
    ids, attn, resp = _check_batch(ids, attention_mask, response_mask, cfg.vocab_size)
    total, cuts = _cuts(ids, attn, resp, batch_size, bucket=bucket, window=window, share_prompts=share_prompts)
    graphdef, state = nnx.split(model)
    for c in _progress(cuts, total, progress, "features"):
        if c.prompt is None:
            x = _extract_many(state, c.ids, c.attn, c.resp, graphdef=graphdef, specs=specs, layers=layers)
        else:
            x = _extract_many_shared(state, *c.prompt, c.ids, c.attn, c.resp, graphdef=graphdef, specs=specs,
                                     layers=layers)
        yield c.rows, x, c.resp, c.start


class _Cut(NamedTuple):
    """One batch to compute: ``rows`` [b] (-1 pads, their response mask zeroed) and its inputs
    ids / attn / resp [b, W]: columns ``[start, start + W)`` of the set, or (``prompt`` =
    (ids, mask) [1, P] left-padded, ``start`` None) each row's response alone, continuing the
    prompt its rows share."""

    rows: np.ndarray
    ids: np.ndarray
    attn: np.ndarray
    resp: np.ndarray
    start: int | None = None
    prompt: tuple[np.ndarray, np.ndarray] | None = None


def _cuts(ids, attn, resp, batch_size: int, *, bucket, window=None, share_prompts: bool = False):
    """(number of batches, iterator of :class:`_Cut`) over a checked set: prompt-shared batches
    (:func:`swiftjax.batching.prompt_batches`) when ``share_prompts`` and the rows have that
    shape, else length-sorted column cuts (:func:`swiftjax.batching.length_batches`)."""
    plan = prompt_batches(ids, attn, resp, batch_size, bucket=bucket) if share_prompts else None
    if plan is None:
        batches = length_batches(attn, batch_size, bucket=bucket, window=window)

        def plain():
            for rows, start, width in batches:
                cols = slice(start, start + width)
                yield _Cut(rows, take(ids, rows)[:, cols], take(attn, rows)[:, cols],
                           take(resp, rows)[:, cols] * (rows >= 0)[:, None], start)

        return len(batches), plain()
    width_p, batches = plan
    first, _ = row_spans(attn)
    r0, r1 = row_spans(resp)

    def shared():
        for b in batches:
            i = b.prompt_row
            p = ids[i, first[i]:r0[i]]
            p_ids = np.zeros((1, width_p), ids.dtype)
            p_mask = np.zeros((1, width_p), attn.dtype)
            p_ids[0, width_p - p.size:] = p
            p_mask[0, width_p - p.size:] = 1
            r_ids = np.zeros((b.rows.size, b.width), ids.dtype)
            r_mask = np.zeros((b.rows.size, b.width), attn.dtype)
            for j, r in enumerate(b.rows):
                if r >= 0:
                    r_ids[j, : r1[r] - r0[r]] = ids[r, r0[r]:r1[r]]
                    r_mask[j, : r1[r] - r0[r]] = 1
            yield _Cut(b.rows, r_ids, r_mask, r_mask.astype(resp.dtype), None, (p_ids, p_mask))

    return len(batches), shared()


def response_rows(features, mask) -> list[np.ndarray]:
    """Compact a padded batch to its response tokens: features [B, T, F], mask [B, T] ->
    a list of B host arrays [T_b, F] (T_b = number of response tokens of row b, in order)."""
    x = np.asarray(features)
    check_rank(x, "features", 3, "[B, T, F]")
    m = np.asarray(mask)
    check_rank(m, "mask", 2, "[B, T]")
    if m.shape != x.shape[:2]:
        raise ValueError(f"mask: expected shape {x.shape[:2]} (features' [B, T]), got {m.shape}")
    return [x[b][m[b] > 0] for b in range(x.shape[0])]


def pad_rows(rows: Sequence, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`response_rows`: B arrays [T_b, F] -> (features [B, Tmax, F] float32,
    mask [B, Tmax] float32), right-padded with zeros; ``pad_to`` fixes Tmax (>= every T_b)."""
    rows = [np.asarray(r) for r in rows]
    if not rows:
        raise ValueError("rows: expected at least one [T_b, F] array, got none")
    for i, r in enumerate(rows):
        check_rank(r, f"rows[{i}]", 2, "[T_b, F]")
    f = rows[0].shape[1]
    if any(r.shape[1] != f for r in rows):
        raise ValueError(f"rows: expected the same feature dim F={f} in every row, got {[r.shape[1] for r in rows]}")
    longest = max(r.shape[0] for r in rows)
    t = longest if pad_to is None else pad_to
    if not _is_int(t) or t < longest or t < 1:
        raise ValueError(f"pad_to: expected an int >= the longest row ({longest}), got {pad_to!r}")
    out = np.zeros((len(rows), int(t), f), np.float32)
    mask = np.zeros((len(rows), int(t)), np.float32)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1.0
    return out, mask


def write_store(path, model, spec: FeatureSpec, ids, attention_mask, response_mask, labels,
                group_ids, *, batch_size: int = 32, window_batches: int = 16, meta: Mapping | None = None,
                progress: bool = False, **kw):
    """Extract the features of a candidate set batch by batch into a feature store at ``path``
    (response tokens only, bf16 on disk; see :mod:`swiftjax.data.store`). labels: [N] in [0, 1];
    group_ids: [N] int (the prompt each candidate answers). Returns the store's path.

    Rows are computed length-sorted inside windows of ``window_batches * batch_size``
    consecutive rows (:func:`iter_feature_batches`) and written in row order, so the store's
    row i is candidate i. Peak memory: one window of response-token features plus the writer's
    shard buffer. Options as :func:`write_stores`."""
    return write_stores([path], model, [spec], ids, attention_mask, response_mask, labels, group_ids,
                        batch_size=batch_size, window_batches=window_batches, metas=[meta], progress=progress,
                        **kw)[0]


def _check_store_space(paths, specs, cfg, tokens: int, resume: bool) -> None:
    """Refuse before the forward when a directory lacks room for its stores: 2 bytes (bf16) per
    feature per response token, less what a resumed store already wrote."""
    from pathlib import Path

    from swiftjax._io import check_free_space, dir_bytes
    from swiftjax.data.store import PARTIAL

    need: dict = {}
    for p, s in zip(paths, specs):
        p = Path(p)
        done = dir_bytes(p.parent / f"{p.name}{PARTIAL}") if resume else 0
        need[p.parent] = need.get(p.parent, 0) + max(0, tokens * feature_dim(s, cfg) * 2 - done)
    for d, n in need.items():
        check_free_space(d, n, f"feature stores ({tokens} response tokens)")


def write_stores(paths: Sequence, model, specs: Sequence[FeatureSpec], ids, attention_mask, response_mask,
                 labels, group_ids, *, batch_size: int = 32, window_batches: int = 16,
                 metas: Sequence[Mapping | None] | None = None, progress: bool = False,
                 share_prompts: bool = False, resume: bool = False, checkpoint_rows: int = 64,
                 **writer_kw) -> list:
    """:func:`write_store` for several specs from ONE forward per batch: store ``paths[s]`` holds
    the features of ``specs[s]`` (with ``metas[s]``). Every store is written whole or not at all:
    an error in any of them aborts them all. Returns the stores' paths.

    share_prompts: rows that repeat a prompt (a candidate set in group order) are computed as
      that prompt prefilled once and each batch of its responses forwarded on the prompt's
      cache (:func:`swiftjax.batching.prompt_batches`); the same features up to float rounding,
      without recomputing the prompt for every candidate. Falls back to length-sorted batches
      when the rows do not have that shape.
    resume: the stores are written resumably (:class:`swiftjax.data.store.FeatureStoreWriter`
      ``resume=True``), checkpointed every ``checkpoint_rows`` rows; a killed run rerun with the
      same arguments continues from the last row every store had checkpointed."""
    from swiftjax.data.store import FeatureStoreWriter

    cfg = _model_cfg(model)
    specs, _ = _check_specs(specs, cfg)
    paths = list(paths)
    metas = [None] * len(specs) if metas is None else list(metas)
    if len(paths) != len(specs) or len(metas) != len(specs):
        raise ValueError(f"paths, metas: expected one per spec ({len(specs)}), got {len(paths)} and {len(metas)}")
    if len({str(p) for p in paths}) != len(paths):
        raise ValueError(f"paths: expected distinct store paths, got {[str(p) for p in paths]}")
    ids, attention_mask, response_mask = _check_batch(ids, attention_mask, response_mask, cfg.vocab_size)
    batch_size = _check_batch_size(batch_size)
    if not _is_int(window_batches) or window_batches < 1:
        raise ValueError(f"window_batches: expected a positive int, got {window_batches!r}")
    if not _is_int(checkpoint_rows) or checkpoint_rows < 1:
        raise ValueError(f"checkpoint_rows: expected a positive int, got {checkpoint_rows!r}")
    n = ids.shape[0]
    labels = np.asarray(labels)
    group_ids = np.asarray(group_ids)
    if labels.shape != (n,) or group_ids.shape != (n,):
        raise ValueError(f"labels, group_ids: expected shape ({n},) (one per row of ids), "
                         f"got {labels.shape} and {group_ids.shape}")
    _check_store_space(paths, specs, cfg, int(np.asarray(response_mask).sum()), resume)
    info = {"model_type": cfg.model_type, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size}
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(FeatureStoreWriter(p, feature_dim(s, cfg), s.to_dict(),
                                                          meta={**info, **dict(m or {})}, resume=resume,
                                                          **writer_kw))
                   for p, s, m in zip(paths, specs, metas)]
        done = _common_checkpoint(writers) if resume else 0
        if done and not all(np.array_equal(lab, labels[:done].astype(np.float32)) and np.array_equal(grp, group_ids[:done])
                            for lab, grp in (w.written() for w in writers)):
            done = _common_checkpoint(writers, 0)  # other labels or groups: the checkpointed rows are another set's
        skip = done
        pending: dict[int, list[np.ndarray]] = {}
        last = done
        if done < n:
            batches = _iter_many(model, ids[skip:], attention_mask[skip:], response_mask[skip:], specs, batch_size,
                                 bucket=64, window=window_batches * batch_size, progress=progress,
                                 share_prompts=share_prompts)
            for rows, feats, mask, _ in batches:
                keep = rows >= 0
                per_spec = [response_rows(jax.device_get(x)[keep], mask[keep]) for x in feats]
                pending.update(zip((rows[keep] + skip).tolist(), zip(*per_spec)))
                run = []
                while done + len(run) in pending:
                    run.append(pending.pop(done + len(run)))
                if run:
                    sel = np.arange(done, done + len(run))
                    for w, rows_s in zip(writers, zip(*run)):
                        w.add(list(rows_s), labels=labels[sel], group_ids=group_ids[sel])
                    done += len(run)
                    if resume and done - last >= checkpoint_rows:
                        for w in writers:
                            w.checkpoint()
                        last = done
    return [w.path for w in writers]


def _common_checkpoint(writers, upto: int | None = None) -> int:
    """Roll resumable writers back to the last row they all checkpointed (at or before ``upto``
    when given); returns it."""
    done = min(w.rows_done for w in writers) if upto is None else upto
    while True:
        got = [w.rollback(done) for w in writers]
        if min(got) == done:
            return done
        done = min(got)


# ----------------------------------------------------------------------------- fused scoring


def fold_head(model, params, spec: FeatureSpec, layers):
    """Traced: the head as per-layer projections ``(taps, {layer: W_l [D, C]}, bias [C])``, or
    None for the top-k modes (not linear in any state).

    'hidden': ``W_l`` are the kernel's row blocks (:func:`swiftjax.methods.swift.head.split_kernel`).
    'logits': the unembedding ``logits = h_L U + z`` is affine, so ``logits W + b = h_L (U W) +
    (z W + b)`` with h_L the final-normed state L (computed once, [D, V] @ [V, C]). Soft-capped
    logits (Gemma's ``final_logit_softcapping``) are not affine in h_L: None, like the top-k modes
    (the logits are computed and projected)."""
    kernel, bias = params["kernel"], params["bias"]
    if spec.mode == "hidden":
        blocks = swift.split_kernel(params, model.config.hidden_size)
        return (Taps(layers=tuple(layers), apply_norm=spec.apply_norm), dict(zip(layers, blocks)),
                bias.astype(jnp.float32))
    if spec.mode == "logits" and getattr(model.config, "final_logit_softcapping", None) is None:
        d = model.config.hidden_size
        zero = model.unembed(jnp.zeros((1, 1, d), jnp.float32))[0, 0].astype(jnp.float32)  # [V]
        u = model.unembed(jnp.eye(d, dtype=jnp.float32)[None])[0].astype(jnp.float32) - zero[None]
        k = kernel.astype(jnp.float32)
        last = model.config.num_layers
        return Taps(layers=(last,), apply_norm=False), {last: u @ k}, bias.astype(jnp.float32) + zero @ k
    return None


def fused_projections(model, params, ids, attn, spec: FeatureSpec, layers, *, folded=None,
                      cache=None, compute_logits: bool = False):
    """Traced building block: ``(proj [B, T, C] = sum_l h_l W_l + b, model output)``.

    Call inside jit with a merged model (``layers`` = :func:`resolve_layers` for 'hidden';
    ``folded`` = :func:`fold_head`'s result, computed here when None). 'hidden' and 'logits'
    sow only [B, T, C] per layer (the head is folded into the forward); the top-k modes need
    the logits themselves and project their top-k features.
    """
    if folded is None:
        folded = fold_head(model, params, spec, layers)
    if folded is not None:
        taps, projections, bias = folded
        out, inter = nnx.capture(model, LayerProjection)(
            ids, attn, cache=cache, taps=taps, projections=projections, compute_logits=compute_logits)
        flat = nnx.to_pure_dict(inter)
        proj = bias
        for i in taps.layers:
            proj = proj + flat[f"proj_{i:03d}"][0]
        return proj, out
    if spec.mode == "token_logprobs" and cache is not None:
        raise ValueError("FeatureSpec.mode 'token_logprobs': a token's log-prob comes from the previous "
                         "step's logits; running scores while decoding support the other modes")
    out = model(ids, attn, cache=cache)
    x = _logit_feats(out.logits, ids, spec)
    proj = jnp.einsum("btf,fc->btc", x, params["kernel"].astype(jnp.float32))
    return proj + params["bias"].astype(jnp.float32), out


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "layers"))
def _fused(state, params, ids, attn, resp, *, graphdef, spec, layers):
    ids, attn, resp = _split_rows(ids, attn, resp)
    proj, _ = fused_projections(nnx.merge(graphdef, state), params, ids, attn, spec, layers)
    return swift.score_from_projections(proj, resp)


def fused_scores(model, params, spec: FeatureSpec, ids, attention_mask, response_mask) -> jax.Array:
    """SWIFT scores [B] of a teacher-forced batch with the head folded into the forward.

    params: a SWIFT head (:func:`swiftjax.methods.swift.head.init_params`) over ``feature_dim(spec)``
    features; ids / masks [B, T]. Equals ``swift.score(params, extract(...), response_mask)``
    without materialising [B, T, F]: each selected layer sows ``h_l @ W_l`` [B, T, C].
    """
    cfg = _model_cfg(model)
    _check_spec(spec)
    _check_head(params, spec, cfg)
    ids, attn, resp = _check_batch(ids, attention_mask, response_mask, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    return _fused(state, params, ids, attn, resp, graphdef=graphdef, spec=spec,
                  layers=_layers_or_empty(spec, cfg))


def fused_scores_batched(model, params, spec: FeatureSpec, ids, attention_mask, response_mask,
                         batch_size: int = 32, *, bucket: int | None = 64, progress: bool = False) -> np.ndarray:
    """:func:`fused_scores` over a whole set [N, T] -> [N] float32, in length-sorted batches cut to
    the columns their rows use (widths rounded up to ``bucket``: a few compilations, no work on
    padding; None: full width in row order, one compilation)."""
    return _over_head_batches(_fused, False, "score", model, params, spec, ids, attention_mask, response_mask,
                              batch_size, progress, bucket)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "layers"))
def _fused_prefix(state, params, ids, attn, resp, *, graphdef, spec, layers):
    ids, attn, resp = _split_rows(ids, attn, resp)
    proj, _ = fused_projections(nnx.merge(graphdef, state), params, ids, attn, spec, layers)
    return swift.prefix_scores_from_projections(proj, resp)


def fused_prefix_scores_batched(model, params, spec: FeatureSpec, ids, attention_mask, response_mask,
                                batch_size: int = 32, *, bucket: int | None = 64,
                                progress: bool = False) -> np.ndarray:
    """[N, T] the SWIFT score of every response prefix of teacher-forced rows (entry t: the
    response up to position t; what decoding's running score reads after that token). Read it
    at response positions: columns outside a batch's span of real tokens are not computed (0)."""
    return _over_head_batches(_fused_prefix, True, "prefix scores", model, params, spec, ids,
                              attention_mask, response_mask, batch_size, progress, bucket)


def _over_head_batches(fn, per_token: bool, label: str, model, params, spec, ids, attention_mask, response_mask,
                       batch_size, progress, bucket) -> np.ndarray:
    """Checked inputs, then the jitted ``fn`` of one head over the whole set (:func:`_over_batches`)."""
    cfg = _model_cfg(model)
    _check_spec(spec)
    _check_head(params, spec, cfg)
    batch_size = _check_batch_size(batch_size)
    ids, attn, resp = _check_batch(ids, attention_mask, response_mask, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    layers = _layers_or_empty(spec, cfg)
    return _over_batches(lambda i, a, r: fn(state, params, i, a, r, graphdef=graphdef, spec=spec, layers=layers),
                         None, (), per_token, label, ids, attn, resp, batch_size, progress, bucket)


def _over_batches(call, call_shared, lead: tuple, per_token: bool, label: str, ids, attn, resp, batch_size,
                  progress, bucket) -> np.ndarray:
    """``call(ids, attn, resp)`` -> [*lead, b] (or [*lead, b, w] when ``per_token``) over
    length-sorted batches cut to their columns (:func:`swiftjax.batching.length_batches`),
    gathered into [*lead, N] (or [*lead, N, T]) float32 in row order. With ``call_shared(prompt_ids,
    prompt_mask, ids, attn, resp)`` (per-row outputs only) the rows are computed as shared
    prompts and their responses when they have that shape (:func:`_cuts`)."""
    total, cuts = _cuts(ids, attn, resp, batch_size, bucket=bucket, share_prompts=call_shared is not None)
    n = ids.shape[0]
    out = np.zeros(tuple(lead) + ((n, ids.shape[1]) if per_token else (n,)), np.float32)
    for c in _progress(cuts, total, progress, label):
        s = np.asarray(call(c.ids, c.attn, c.resp) if c.prompt is None else call_shared(*c.prompt, c.ids, c.attn, c.resp))
        keep = c.rows >= 0
        if per_token:
            out[..., c.rows[keep], c.start:c.start + c.ids.shape[1]] = s[..., keep, :]
        else:
            out[..., c.rows[keep]] = s[..., keep]
    return out


def _head_projection(model, params, spec: FeatureSpec, layers, states, logits, ids, first=None):
    """Traced: [B, T, C] = the head over one spec's features, from sown raw states / logits
    (``first``: as :func:`_features_from`)."""
    if spec.mode == "hidden":
        proj = params["bias"].astype(jnp.float32)
        for i, w in zip(layers, swift.split_kernel(params, model.config.hidden_size)):
            proj = proj + jnp.einsum("btd,dk->btk", _tap(model, states[i], spec.apply_norm), w.astype(jnp.float32))
        return proj
    x = _logit_feats(logits, ids, spec, first)
    return jnp.einsum("btf,fc->btc", x, params["kernel"].astype(jnp.float32)) + params["bias"].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "specs", "layers"))
def _fused_many(state, heads, ids, attn, resp, *, graphdef, specs, layers):
    ids, attn, resp = _split_rows(ids, attn, resp)
    model = nnx.merge(graphdef, state)
    states, logits = _sown(model, ids, attn, specs, layers)
    logits = _stats(logits, model, ids, specs)
    return jnp.stack([swift.score_from_projections(_head_projection(model, p, s, ls, states, logits, ids), resp)
                      for p, s, ls in zip(heads, specs, layers)])


@functools.partial(jax.jit, static_argnames=("graphdef", "specs", "layers"))
def _fused_many_shared(state, heads, prompt_ids, prompt_mask, ids, attn, resp, *, graphdef, specs, layers):
    ids, attn, resp = _split_rows(ids, attn, resp)
    model = nnx.merge(graphdef, state)
    states, logits, first = _sown_shared(model, prompt_ids, prompt_mask, ids, attn, specs, layers)
    logits, first = _stats(logits, model, ids, specs), _stats(first)
    return jnp.stack([swift.score_from_projections(_head_projection(model, p, s, ls, states, logits, ids, first),
                                                   resp)
                      for p, s, ls in zip(heads, specs, layers)])


def fused_scores_many(model, heads: Sequence[tuple[Any, FeatureSpec]], ids, attention_mask, response_mask,
                      batch_size: int = 32, *, bucket: int | None = 64, progress: bool = False,
                      share_prompts: bool = False) -> np.ndarray:
    """The scores of several SWIFT heads (``(params, spec)`` pairs, any mix of specs) over a whole
    set from ONE forward per batch -> [H, N] float32, each row equal to
    :func:`fused_scores_batched` of that head. The forward sows the raw states of the union of
    the heads' layers (each head applies the final norm itself when its spec asks) and the
    logits when a logits-mode head needs them; memory per batch: those states, [B, T, D] each.
    ``share_prompts``: as :func:`write_stores` (each prompt computed once for its responses)."""
    cfg = _model_cfg(model)
    if not isinstance(heads, Sequence) or not heads or not all(isinstance(h, tuple) and len(h) == 2 for h in heads):
        raise ValueError("heads: expected a non-empty sequence of (params, FeatureSpec) pairs")
    specs, layers = _check_specs([s for _, s in heads], cfg)
    for p, s in heads:
        _check_head(p, s, cfg)
    batch_size = _check_batch_size(batch_size)
    ids, attn, resp = _check_batch(ids, attention_mask, response_mask, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    params = tuple(p for p, _ in heads)
    shared = None
    if share_prompts:
        def shared(pi, pm, i, a, r):
            return _fused_many_shared(state, params, pi, pm, i, a, r, graphdef=graphdef, specs=specs, layers=layers)
    return _over_batches(lambda i, a, r: _fused_many(state, params, i, a, r, graphdef=graphdef, specs=specs,
                                                     layers=layers),
                         shared, (len(heads),), False, "scores", ids, attn, resp, batch_size, progress, bucket)


# ----------------------------------------------------------------------------- decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScoredGeneration:
    """:class:`swiftjax.sampling.GenerateOutput` plus the SWIFT head read at every step.

    tokens [B, N], logprobs [B, N], lengths [B], finished [B]: as ``decode.generate``.
    token_proj: [B, N, C] per generated token ``(u_t, r_t)`` (gated) or ``(r_t,)``, bias
      included; zero after a row's end token.
    running: [B, N] score of the response prefix up to and including token n (constant after
      the end token, and after the loop stopped).
    scores: [B] score of the whole response (= ``running[:, -1]``).
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    token_proj: jax.Array
    running: jax.Array
    scores: jax.Array


@dataclasses.dataclass(frozen=True)
class _ScoredDecoder(LMDecoder):
    """One model whose every step also sows the head's per-layer projections: records
    ``(u_t, r_t)`` per generated token and the running score of the partial response."""

    spec: FeatureSpec | None = None
    layers: tuple = ()
    prune: Any = None          # a PruneConfig: stop each group's lowest running scores at checkpoints
    prune_group: int = 1       # consecutive rows that are one problem's candidates

    def setup(self, models, params):
        return params, fold_head(models()[0], params, self.spec, self.layers)  # once, outside the loop

    def prefill(self, models, ctx, prompts, cfg):
        caches, logits = super().prefill(models, None, prompts, cfg)
        b, n, c = logits.shape[0], cfg.max_new_tokens, ctx[0]["kernel"].shape[1]
        aux = {"cache": caches[0], "proj": jnp.zeros((b, n, c), jnp.float32),
               "running": jnp.zeros((b, n), jnp.float32), "run": swift.running_score_init(b, gated=c == 2)}
        return aux, logits

    def advance(self, models, ctx, aux, tok, live, step):
        params, folded = ctx
        b = tok.shape[0]
        # a module merged inside the loop body: nnx.capture mutates it at this trace level
        proj, o = fused_projections(models()[0], params, tok[:, None], jnp.ones((b, 1), jnp.int32), self.spec,
                                    self.layers, folded=folded, cache=aux["cache"], compute_logits=True)
        p = jnp.where(live[:, None], proj[:, 0], 0.0)
        run = swift.running_score_update(aux["run"], p, live)
        return {"cache": constrain_cache(o.cache), "proj": aux["proj"].at[:, step].set(p),
                "running": aux["running"].at[:, step].set(swift.running_score_value(run)), "run": run}, o.logits[:, -1]

    def stop(self, ctx, aux, step, done):
        if self.prune is None:
            return None
        g = self.prune_group
        score = swift.running_score_value(aux["run"]).reshape(-1, g)
        drop = drop_lowest(score, ~done.reshape(-1, g), self.prune.fraction, self.prune.min_keep).reshape(-1)
        return drop & ((step + 1) % self.prune.every == 0)

    def finish(self, ctx, state):
        final = swift.running_score_value(state.aux["run"])
        n = state.tokens.shape[1]
        running = jnp.where(jnp.arange(n)[None, :] < state.step, state.aux["running"], final[:, None])
        return {"token_proj": state.aux["proj"], "running": running, "scores": final}


def generate_with_scores(model, params, spec: FeatureSpec, input_ids, attention_mask=None, *,
                         key=None, cfg: SamplingConfig, cache_dtype=jnp.float32, prune=None,
                         prune_group: int = 1, prompt_groups: int = 1) -> ScoredGeneration:
    """Sample continuations and score them with a SWIFT head while decoding.

    Same sampling as :func:`swiftjax.sampling.generate` (prefill, then one token a step in a
    ``lax.while_loop``; the same key gives the same tokens). Each step's forward over the new
    token also sows the head's per-layer projections, giving ``(u_t, r_t)`` of that token and
    the running score of the partial response (:class:`swiftjax.methods.swift.head.RunningScore`). The
    final score equals :func:`fused_scores` on the teacher-forced prompt + response (end token
    included). input_ids / attention_mask: [B, T] left-padded prompts.

    ``prune`` (a :class:`swiftjax.methods.swift.prune.PruneConfig`): rows come in consecutive
    groups of ``prune_group`` candidates of one problem; after every ``prune.every`` tokens
    the lowest running scores of each group's live rows stop (``finished`` False, ``lengths``
    the tokens they generated); the kept rows' tokens equal the unpruned call's.
    ``prompt_groups``: prefill each run of identical prompts once (:func:`swiftjax.sampling.run_sampler`).
    """
    mcfg = _model_cfg(model)
    _check_spec(spec)
    _check_head(params, spec, mcfg)
    if prune is not None:
        b = np.shape(input_ids)[0]
        if isinstance(prune_group, bool) or not isinstance(prune_group, int) or prune_group < 1 or b % prune_group:
            raise ValueError(f"prune_group: expected a positive divisor of the batch ({b} rows), got {prune_group!r}")
    decoder = _ScoredDecoder(cache_dtype=cache_dtype, spec=spec, layers=_layers_or_empty(spec, mcfg), prune=prune,
                             prune_group=prune_group)
    out, extra = run_sampler(decoder, [model], [(input_ids, attention_mask)], key=key, cfg=cfg, args=params,
                             prompt_groups=prompt_groups)
    return ScoredGeneration(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths, finished=out.finished,
                            **extra)
