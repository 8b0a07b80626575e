"""A conventional scalar reward model: a causal LM body with a linear head on the last token.

``RewardModel`` wraps the decoder LM of any backbone (:class:`swiftjax.backbone.Backbone`'s
``model``: any :class:`swiftjax.models.transformer.DecoderLM`; ``D`` is its own config's
``hidden_size``) and adds ``head = Linear(D, 1)`` applied to the final-normed hidden state of
the last real token of a right-padded sequence (index ``sum(mask) - 1``). Sequences are the
backbone's teacher-forced rows (:meth:`swiftjax.backbone.Backbone.encode_pairs`: its rendered
prompt, the response up to its end-of-turn id, its pad id under a zero attention mask), so
that token is the response's last. That state is the EBRM embedding ``e``; the head's output
is the reward ``r0`` (the method: docs/ebrm.md).

Training is Bradley–Terry on (chosen, rejected) pairs, ``-log sigmoid(r_c - r_r)``, through the
generic loop (:mod:`swiftjax.train.loop`); the body can be partly frozen (train the head and the
last ``k`` blocks plus the final norm). Label noise for experiments: :func:`flip_mask` /
:func:`flip_pairs` swap an exact, seeded fraction of the pairs.

Shapes: ids / attention_mask [B, T] (right padding: each mask row is ones then zeros, at least
one one); pairs [P, 2] int (column 0 chosen, column 1 rejected; row indices into a response set).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax._checks import check_float, check_int, check_rank, check_same_shape
from swiftjax.batching import epoch_batches, map_batches
from swiftjax.models.transformer import DecoderLM
from swiftjax.train import loop

__all__ = [
    "RewardModel",
    "init_reward_model",
    "last_token_index",
    "rm_forward",
    "bt_loss",
    "pair_accuracy",
    "rm_pair_loss",
    "flip_mask",
    "flip_pairs",
    "check_pairs",
    "trainable_filter",
    "RMTrainConfig",
    "pair_arrays",
    "train_reward_model",
    "score_responses",
]


# ----------------------------------------------------------------------------- module


class RewardModel(nnx.Module):
    """``lm``: a :class:`swiftjax.models.transformer.DecoderLM`; ``head``: Linear(D, 1), float32.

    The head's kernel starts ~ N(0, head_init_std^2), its bias at 0.
    """

    def __init__(self, lm, *, rngs: nnx.Rngs, head_init_std: float = 0.02):
        d = int(lm.config.hidden_size)
        self.lm = lm
        self.head = nnx.Linear(
            d, 1, use_bias=True, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32,
            kernel_init=nnx.initializers.normal(float(head_init_std)),
            bias_init=nnx.initializers.zeros_init(),
        )


def init_reward_model(lm, seed: int = 0, head_init_std: float = 0.02) -> RewardModel:
    """A :class:`RewardModel` around ``lm`` (kept by reference, not copied); head from ``seed``."""
    if not isinstance(lm, DecoderLM):
        raise ValueError(f"lm: expected a swiftjax DecoderLM (e.g. from swiftjax.load_model), got {type(lm).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not (np.isfinite(head_init_std) and head_init_std >= 0):
        raise ValueError(f"head_init_std: expected a finite float >= 0, got {head_init_std!r}")
    return RewardModel(lm, rngs=nnx.Rngs(int(seed)), head_init_std=head_init_std)


# ----------------------------------------------------------------------------- forward


def _last_index(attention_mask):
    return jnp.sum(attention_mask.astype(jnp.int32), axis=-1) - 1


def _check_right_padded(attention_mask) -> None:
    """On concrete masks: every row is ones then zeros, with at least one one."""
    try:
        m = np.asarray(attention_mask)
    except Exception:  # traced: shapes were checked, values cannot be
        return
    if m.size == 0:
        raise ValueError(f"attention_mask: expected a non-empty [B, T] mask, got shape {m.shape}")
    m = m != 0
    n = m.sum(axis=-1)
    if np.any(n == 0):
        raise ValueError(f"attention_mask: expected at least one token per row, row {int(np.argmin(n))} is empty")
    want = np.arange(m.shape[-1])[None, :] < n[:, None]
    bad = np.flatnonzero(np.any(want != m, axis=-1))
    if bad.size:
        raise ValueError(
            f"attention_mask: expected right padding (ones then zeros) in every row, row {int(bad[0])} is not"
        )


def _check_ids_mask(ids, attention_mask) -> None:
    check_rank(ids, "ids", 2, "[B, T]")
    check_int(ids, "ids")
    check_rank(attention_mask, "attention_mask", 2, "[B, T]")
    check_same_shape(ids, attention_mask, "ids", "attention_mask")
    _check_right_padded(attention_mask)


def last_token_index(attention_mask) -> jax.Array:
    """Index of the last real token of each right-padded row: ``sum(mask) - 1`` [B] int32."""
    check_rank(attention_mask, "attention_mask", 2, "[B, T]")
    _check_right_padded(attention_mask)
    return _last_index(jnp.asarray(attention_mask))


def _rm_forward(model: RewardModel, ids, attention_mask):
    out = model.lm(ids, attention_mask, output_hidden_states=True, compute_logits=False)
    h = out.hidden_states[-1]  # after the final norm (HF convention)
    idx = _last_index(attention_mask)
    e = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [B, D]
    return model.head(e)[:, 0], e


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_jit(graphdef, state, ids, attention_mask):
    return _rm_forward(nnx.merge(graphdef, state), ids, attention_mask)


def rm_forward(model: RewardModel, ids, attention_mask):
    """(reward [B] float32, embedding [B, D] float32) of right-padded sequences.

    ``embedding`` is the final-normed hidden state at ``sum(mask) - 1`` (the head's input);
    ``reward = embedding @ head.kernel + head.bias``. Jitted (one compilation per model structure
    and batch shape); under an outer jit the padding check is skipped. Use
    :func:`score_responses` for large sets.
    """
    if not isinstance(model, RewardModel):
        raise ValueError(f"model: expected a RewardModel, got {type(model).__name__}")
    _check_ids_mask(ids, attention_mask)
    graphdef, state = nnx.split(model)
    return _score_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(attention_mask))


# ----------------------------------------------------------------------------- loss


def _bt(r_chosen, r_rejected):
    return jnp.mean(jax.nn.softplus(-(r_chosen - r_rejected)))


def _acc(r_chosen, r_rejected):
    return jnp.mean((r_chosen > r_rejected).astype(jnp.float32))


def _check_pair_scores(r_chosen, r_rejected):
    check_rank(r_chosen, "r_chosen", 1, "[P]")
    check_same_shape(r_chosen, r_rejected, "r_chosen", "r_rejected")
    check_float(r_chosen, "r_chosen")
    check_float(r_rejected, "r_rejected")
    if np.shape(r_chosen)[0] == 0:
        raise ValueError("r_chosen: expected at least one pair, got P=0")


def bt_loss(r_chosen, r_rejected) -> jax.Array:
    """Bradley–Terry loss ``mean_p -log sigmoid(r_c - r_r)`` (as softplus): [P], [P] -> []."""
    _check_pair_scores(r_chosen, r_rejected)
    return _bt(jnp.asarray(r_chosen, jnp.float32), jnp.asarray(r_rejected, jnp.float32))


def pair_accuracy(r_chosen, r_rejected) -> jax.Array:
    """Fraction of pairs with ``r_c > r_r`` strictly (ties count wrong): [P], [P] -> []."""
    _check_pair_scores(r_chosen, r_rejected)
    return _acc(jnp.asarray(r_chosen), jnp.asarray(r_rejected))


def rm_pair_loss(model: RewardModel, batch, rng=None):
    """BT loss of a pair batch ``{ids_c, attn_c, ids_r, attn_r}`` ([B, T] each), one forward
    over [2B, T]. Returns (loss, {'acc': pair accuracy, 'margin': mean(r_c - r_r)})."""
    b = batch["ids_c"].shape[0]
    ids = jnp.concatenate([batch["ids_c"], batch["ids_r"]], axis=0)
    attn = jnp.concatenate([batch["attn_c"], batch["attn_r"]], axis=0)
    r, _ = _rm_forward(model, ids, attn)
    rc, rr = r[:b], r[b:]
    return _bt(rc, rr), {"acc": _acc(rc, rr), "margin": jnp.mean(rc - rr)}


# ----------------------------------------------------------------------------- label noise


def flip_mask(n: int, frac: float, seed: int) -> np.ndarray:
    """bool [n] with exactly ``round(frac * n)`` (Python's round) True entries at seeded random
    positions (the first ``round(frac * n)`` of a ``default_rng(seed)`` permutation)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    try:
        f = float(frac)
    except (TypeError, ValueError):
        raise ValueError(f"frac: expected a float in [0, 1], got {frac!r}")
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"frac: expected a float in [0, 1], got {frac!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    k = int(round(f * int(n)))
    out = np.zeros(int(n), bool)
    out[np.random.default_rng(int(seed)).permutation(int(n))[:k]] = True
    return out


def check_pairs(pairs, n_rows: int | None = None, name: str = "pairs") -> np.ndarray:
    """Validate pairs [P, 2] of row indices (in [0, n_rows) when given); returns int64 numpy."""
    arr = np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected shape [P, 2] (chosen, rejected), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer row indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or (n_rows is not None and arr.max() >= n_rows)):
        raise ValueError(f"{name}: expected row indices in [0, {n_rows}), got [{arr.min()}, {arr.max()}]")
    return arr


def flip_pairs(pairs, frac: float, seed: int):
    """Swap chosen and rejected in an exact, seeded fraction of the pairs.

    pairs [P, 2] -> (noisy pairs [P, 2] int64, flipped bool [P]) with
    ``flipped.sum() == round(frac * P)`` (see :func:`flip_mask`).
    """
    arr = check_pairs(pairs)
    flipped = flip_mask(arr.shape[0], frac, seed)
    out = arr.copy()
    out[flipped] = arr[flipped][:, ::-1]
    return out, flipped


# ----------------------------------------------------------------------------- training


def _final_norm_module(lm):
    for chain in (("model", "norm"), ("transformer", "ln_f")):
        node = lm
        try:
            for a in chain:
                node = getattr(node, a)
        except AttributeError:
            continue
        return node
    raise ValueError(f"lm: cannot find the final norm of {type(lm).__name__} (expected model.norm or transformer.ln_f)")


def trainable_filter(model: RewardModel, train_last_layers: int | None) -> Callable[[Any, Any], bool] | type:
    """The nnx filter of trainable variables.

    None: every ``nnx.Param`` (full fine-tuning). ``k`` in [0, L]: the head's params, and for
    ``k >= 1`` also the last ``k`` blocks and the final norm; the rest of the body is frozen.
    """
    if train_last_layers is None:
        return nnx.Param
    n_layers = len(list(model.lm.blocks()))
    k = train_last_layers
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n_layers:
        raise ValueError(f"train_last_layers: expected None or an int in [0, {n_layers}], got {k!r}")
    targets = [model.head]
    if k > 0:
        targets += list(model.lm.blocks())[n_layers - int(k):] + [_final_norm_module(model.lm)]
    wanted = {id(t) for t in targets}
    prefixes = tuple(tuple(p) for p, node in nnx.iter_graph(model) if id(node) in wanted)

    def keep(path, x) -> bool:
        path = tuple(path)
        return isinstance(x, nnx.Param) and any(path[: len(p)] == p for p in prefixes)

    return keep


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
    """BT training recipe. ``epochs`` and/or ``max_steps`` (whichever ends first);
    ``train_last_layers``: see :func:`trainable_filter`; AdamW with linear warm-up, constant."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int | None = 1
    max_steps: int | None = None
    warmup_steps: int = 0
    clip_norm: float | None = 1.0
    train_last_layers: int | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("RMTrainConfig: expected epochs or max_steps (or both), got neither")

    def optimizer(self) -> loop.OptimizerConfig:
        return loop.OptimizerConfig(name="adamw", lr=float(self.lr), weight_decay=float(self.weight_decay),
                               warmup_steps=int(self.warmup_steps),
                               clip_norm=None if self.clip_norm is None else float(self.clip_norm))


def pair_arrays(ids, attention_mask, pairs) -> dict[str, np.ndarray]:
    """Gather a pair dataset ``{ids_c, attn_c, ids_r, attn_r}`` [P, T] from responses [N, T]."""
    ids = np.asarray(ids)
    attn = np.asarray(attention_mask)
    _check_ids_mask(ids, attn)
    pr = check_pairs(pairs, ids.shape[0])
    if pr.shape[0] == 0:
        raise ValueError("pairs: expected at least one pair, got P=0")
    return {"ids_c": ids[pr[:, 0]], "attn_c": attn[pr[:, 0]], "ids_r": ids[pr[:, 1]], "attn_r": attn[pr[:, 1]]}


_copy_tree = jax.jit(lambda t: jax.tree.map(jnp.copy, t))  # one compilation, not one per array shape


@functools.lru_cache(maxsize=8)
def _rm_train_step(graphdef, opt_cfg):
    """One jitted BT train step per (model structure, optimizer): reused across runs."""
    tx = loop.make_optimizer(opt_cfg)
    loss_fn = loop.nnx_loss(graphdef, rm_pair_loss)
    return tx, loop.make_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(opt_cfg))


def train_reward_model(model: RewardModel, ids, attention_mask, pairs, cfg: RMTrainConfig, *,
                       writer=None, progress: bool = False, desc: str = "reward model"):
    """Train with BT on ``pairs`` [P, 2] (chosen, rejected) of responses ids / mask [N, T].

    Returns ``(trained RewardModel, loop.FitResult)``. The input model is left untouched (its
    arrays are copied before the donating train step), so one initial model can be trained
    several times (e.g. once per label-noise level; the jitted step is reused). Batches are
    shuffled per epoch from ``cfg.seed``; the last partial batch is dropped.
    """
    if not isinstance(model, RewardModel):
        raise ValueError(f"model: expected a RewardModel, got {type(model).__name__}")
    if not isinstance(cfg, RMTrainConfig):
        raise ValueError(f"cfg: expected an RMTrainConfig, got {type(cfg).__name__}")
    data = pair_arrays(ids, attention_mask, pairs)
    n = data["ids_c"].shape[0]
    graphdef, params, frozen = loop.nnx_split(model, trainable_filter(model, cfg.train_last_layers))
    # the train step donates the whole state (frozen part included): copy, keep the input intact
    params, frozen = _copy_tree((params, frozen))
    tx, step = _rm_train_step(graphdef, cfg.optimizer())
    state = loop.init_state(params, tx, cfg.seed, frozen=frozen)
    batches = epoch_batches(data, min(cfg.batch_size, n), cfg.seed, shuffle=True, drop_last=True)
    res = loop.fit(state, step, batches, max_steps=cfg.max_steps, epochs=cfg.epochs, writer=writer,
                   log_every=10 if writer is not None else 0, progress=progress, desc=desc)
    return loop.nnx_merge(graphdef, res.state.params, res.state.frozen), res  # frozen was donated too


# ----------------------------------------------------------------------------- scoring


def score_responses(model: RewardModel, ids, attention_mask, batch_size: int = 128):
    """(rewards [N] float32, embeddings [N, D] float32) as numpy, in fixed-size jitted batches
    (the last one padded with copies of its last row, so one compilation serves any N)."""
    if not isinstance(model, RewardModel):
        raise ValueError(f"model: expected a RewardModel, got {type(model).__name__}")
    ids = np.asarray(ids)
    attn = np.asarray(attention_mask)
    _check_ids_mask(ids, attn)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    graphdef, state = nnx.split(model)
    r, e = map_batches(lambda i, m: _score_jit(graphdef, state, i, m), (ids, attn), int(min(batch_size, ids.shape[0])))
    return r.astype(np.float32), e.astype(np.float32)
