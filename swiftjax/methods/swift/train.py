"""The SWIFT training recipe (spec: AdamW lr 1e-4, wd 1e-5, batches of 2 problems x 8
rollouts, <= 40 epochs, 20% of problems held out, early stop after 3 epochs without a
better validation loss) on the generic optax loop. Unlike the reference, the *best*
validation weights are returned (the reference keeps a reference to, not a copy of, them).

Features come from a *source*: any object with ``feature_dim``, ``max_len`` and
``batch(indices, pad_to) -> (features [B, T, F], mask [B, T])`` — the on-disk :class:`swiftjax.data.store.FeatureStore`, the in-memory
:class:`ArraySource`, or a :class:`LayerView` of either (a layer subset, optionally normed). Rows are candidates; ``groups`` [G, K] holds the row index of each
rollout of each group (a group = one problem's K rollouts), ``labels`` [G, K] correctness.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax.batching import round_up
from swiftjax.methods.swift import head as swift
from swiftjax._checks import check_rank, check_same_shape


@dataclasses.dataclass(frozen=True)
class SwiftTrainConfig:
    loss: str = "ce"
    alpha: float = 0.01          # infonca / nca temperature
    gated: bool = True
    lr: float = 1e-4
    weight_decay: float = 1e-5
    groups_per_batch: int = 2    # problems per batch; each contributes its K rollouts
    max_epochs: int = 40
    val_frac: float = 0.2
    patience: int = 3
    seed: int = 42
    # train on each feature standardized by its mean and standard deviation over the training
    # rows' response tokens, then fold them into the kernel and bias (the saved head reads raw
    # features): hidden states with a few huge dimensions then train at one learning rate
    standardize: bool = False

    def __post_init__(self):
        if self.loss not in swift.LOSSES:
            raise ValueError(f"loss: expected one of {sorted(swift.LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.val_frac < 1.0:
            raise ValueError(f"val_frac: expected in [0, 1), got {self.val_frac}")


class ArraySource:
    """In-memory features: ``features`` [N, T, F], ``mask`` [N, T]."""

    def __init__(self, features, mask):
        check_rank(features, "features", 3, "[N, T, F]")
        check_rank(mask, "mask", 2, "[N, T]")
        if features.shape[:2] != mask.shape:
            raise ValueError(f"mask: expected shape {features.shape[:2]}, got {mask.shape}")
        self.features, self.mask = features, mask
        self.feature_dim = features.shape[-1]
        self.max_len = features.shape[1]

    def __len__(self):
        return self.features.shape[0]

    def batch(self, indices, pad_to=None, *, columns=None):
        if pad_to not in (None, self.max_len):
            raise ValueError(f"pad_to: expected None or {self.max_len}, got {pad_to}")
        idx = np.asarray(indices)
        x = self.features[idx] if columns is None else self.features[idx][..., np.asarray(columns)]
        return np.asarray(x, np.float32), np.asarray(self.mask[idx])


def layer_columns(source_layers, layers, d: int) -> np.ndarray:
    """The feature indices of ``layers``' blocks (in that order) in features made of the
    ``d``-wide blocks of ``source_layers``."""
    pos = {l: j for j, l in enumerate(source_layers)}
    return np.concatenate([np.arange(pos[l] * d, (pos[l] + 1) * d) for l in layers])


class LayerView:
    """A hidden-state feature source cut from a wider one.

    source: a source whose features are the blocks of ``source_layers`` (each ``d`` wide, in
    index order: a ``'hidden'`` store without the final norm) and whose ``batch`` accepts
    ``columns``; layers: the subset to serve (index order, as a spec concatenates them); norm:
    None, or the model's final norm ([..., d] -> [..., d]) applied to each block after reading.
    One all-layer raw store thus serves every layer subset with and without the norm (the norm
    then sees the bf16-rounded stored states; a store written normed would round after it)."""

    def __init__(self, source, source_layers, layers, d: int, norm=None):
        source_layers, layers = tuple(source_layers), tuple(sorted(layers))
        if source.feature_dim != len(source_layers) * d:
            raise ValueError(f"source: expected {len(source_layers)} blocks of d={d} features "
                             f"({len(source_layers) * d}), got feature_dim {source.feature_dim}")
        missing = sorted(set(layers) - set(source_layers))
        if not layers or missing:
            raise ValueError(f"layers: expected a non-empty subset of the source's layers {list(source_layers)}, "
                             f"missing {missing}")
        self.source, self.d, self.norm = source, d, norm
        cols = layer_columns(source_layers, layers, d)
        # every block in order: read rows whole (no column gather)
        self.columns = None if np.array_equal(cols, np.arange(source.feature_dim)) else cols
        self.feature_dim = len(layers) * d
        self.max_len = source.max_len
        self.lengths = getattr(source, "lengths", None)
        self._layers, self._source_layers = layers, source_layers

    def __len__(self):
        return len(self.source)

    def unnormed(self) -> "LayerView":
        """The same columns without the norm (what training reads; :meth:`apply_norm` then
        runs inside the jitted step)."""
        return LayerView(self.source, self._source_layers, self._layers, self.d)

    def apply_norm(self, x):
        """The norm of each ``d``-wide block of ``x`` [..., F] in float32 (a JAX function: the
        training step and the scoring apply it on the device, fused with the head)."""
        x = jnp.asarray(x, jnp.float32)
        return self.norm(x.reshape(*x.shape[:-1], -1, self.d)).reshape(x.shape).astype(jnp.float32)

    def batch(self, indices, pad_to=None, *, exact_bf16: bool = False):
        """(features [B, T, F], mask [B, T]); ``exact_bf16`` is passed on when no norm is
        applied (a normed block is float32: rounding it again would change it)."""
        if self.norm is None:
            return self.source.batch(indices, pad_to, columns=self.columns, **_bf16_kw(self.source, exact_bf16))
        x, m = self.source.batch(indices, pad_to, columns=self.columns)
        if x.base is not None or not x.flags.writeable:  # never write into a source's own memory
            x = np.array(x, np.float32)
        # one row at a time, in place: a wide batch (all 25 layers of a 0.5B model: 2 GB) is
        # held once, not three times over (the input, JAX's copy and the normed output)
        for i in range(x.shape[0]):
            x[i] = np.asarray(self.apply_norm(x[i]))
        x *= m[..., None]
        return x, m


def device_split(source):
    """(the source to read, a JAX function of its features [B, T, F] run inside the jitted
    step, or None): a normed :class:`LayerView` is read raw (bf16 from a store) and normed on
    the device, fused with the head, instead of on the host in float32 (which reads and
    writes every value several times over); every other source is read as it is."""
    if isinstance(source, LayerView) and source.norm is not None:
        return source.unnormed(), source.apply_norm
    return source, None


def _bf16_kw(source, want: bool) -> dict:
    """``exact_bf16=True`` for sources that hold bf16 values exactly (a feature store, a LayerView
    without norm of one); nothing for the others (they give float32)."""
    from swiftjax.data.store import FeatureStore

    if not want:
        return {}
    if isinstance(source, FeatureStore) or (isinstance(source, LayerView) and source.norm is None
                                             and _bf16_kw(source.source, True)):
        return {"exact_bf16": True}
    return {}


PAD_BUCKET = 64  # batches are padded to their longest row rounded up to this: few shapes, little padding


def _pad_width(source, rows) -> int:
    """The padded width of a batch of ``rows``: its longest row rounded up to ``PAD_BUCKET``
    (at most ``source.max_len``) when the source knows its rows' lengths, else ``max_len``
    (one shape). The padding is masked out, so the width never changes a score."""
    lengths = getattr(source, "lengths", None)
    if lengths is None:
        return source.max_len
    longest = int(np.max(np.asarray(lengths)[np.asarray(rows)]))
    return round_up(longest, PAD_BUCKET, source.max_len)


def split_groups(num_groups: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Problem-level split: (train group ids, validation group ids), seeded."""
    order = np.random.default_rng(seed).permutation(num_groups)
    n_val = int(round(num_groups * val_frac))
    if val_frac > 0 and n_val == 0:
        n_val = 1
    if num_groups - n_val < 1:
        raise ValueError(f"split_groups: {num_groups} groups leave none for training at val_frac={val_frac}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _group_loss(cfg: SwiftTrainConfig, transform=None):
    fn = swift.loss_fn(cfg.loss, alpha=cfg.alpha)

    def loss(params, batch, rng=None):
        g, k = batch["labels"].shape
        x = batch["features"] if transform is None else transform(batch["features"])
        s = swift.score(params, x, batch["mask"]).reshape(g, k)
        return fn(s, batch["labels"]), {}

    return loss


def _make_batch(source, groups, labels, gids):
    rows = groups[gids].reshape(-1)
    # the store's own bf16 values when it can give them: half the bytes into JAX, same numbers
    feats, mask = source.batch(rows, pad_to=_pad_width(source, rows), **_bf16_kw(source, True))
    return {"features": jnp.asarray(feats), "mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels[gids], jnp.float32)}


@jax.jit
def _all_finite(params, loss):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
    return jnp.isfinite(loss) & jnp.all(jnp.stack(leaves))


def _checked_step(step):
    """``step`` that raises ValueError as soon as the loss or the params stop being finite
    (one scalar read back per step: the head is tiny, so is the cost)."""

    def checked(state, batch):
        new, metrics = step(state, batch)
        if not bool(_all_finite(new.params, metrics["loss"])):
            raise ValueError(
                f"train_head: expected a finite loss and params, got loss {float(metrics['loss'])} "
                f"at step {int(jax.device_get(new.step))} (NaN/inf features at response positions "
                "(mask 1), or a learning rate that diverges)")
        return new, metrics

    return checked


def train_head(source, groups, labels, cfg: SwiftTrainConfig = SwiftTrainConfig(), *,
               writer=None, progress: bool = True) -> tuple[dict, dict]:
    """Train a SWIFT head; returns (best params, info with history and split sizes).

    Raises ValueError as soon as the training loss, the params or the validation loss
    become non-finite (never returns NaN params)."""
    from swiftjax.train import loop

    groups = np.asarray(groups)
    labels = np.asarray(labels, np.float32)
    check_rank(groups, "groups", 2, "[G, K]")
    check_same_shape(groups, labels, "groups", "labels")
    g_train, g_val = split_groups(groups.shape[0], cfg.val_frac, cfg.seed)
    bsz = cfg.groups_per_batch
    if len(g_train) < bsz:
        raise ValueError(f"train_head: expected >= {bsz} training groups, got {len(g_train)}")
    params = swift.init_params(jax.random.key(cfg.seed), source.feature_dim, gated=cfg.gated)
    tx = loop.make_optimizer(loop.OptimizerConfig(name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay))
    source, transform = device_split(source)
    moments = None
    if cfg.standardize:
        moments = feature_moments(source, groups[g_train].reshape(-1), transform)
        transform = _standardizer(transform, *moments)
    loss = _group_loss(cfg, transform)
    step = _checked_step(loop.make_train_step(loss, tx))

    def batches(epoch):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(g_train)
        for s in range(0, len(order) - len(order) % bsz, bsz):
            yield _make_batch(source, groups, labels, order[s:s + bsz])

    steps_per_epoch = len(g_train) // bsz
    eval_fn = None
    early = None
    if len(g_val):
        val_rows = groups[g_val].reshape(-1)
        val_labels = jnp.asarray(labels[g_val])
        group_loss = jax.jit(swift.loss_fn(cfg.loss, alpha=cfg.alpha))

        def eval_fn(p):  # exact loss over all validation groups at once
            s = _score_rows(p, source, val_rows, transform).reshape(val_labels.shape)
            bad = np.flatnonzero(~np.isfinite(s.reshape(-1)))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"train_head: expected finite validation scores, got {s.reshape(-1)[i]} for row "
                                 f"{int(val_rows[i])} (NaN/inf features at response positions (mask 1))")
            return {"loss": float(group_loss(jnp.asarray(s), val_labels))}

        early = loop.EarlyStopping(metric="loss", mode="min", patience=cfg.patience)
    res = loop.fit(loop.init_state(params, tx, cfg.seed), step, batches, epochs=cfg.max_epochs,
                   eval_fn=eval_fn, eval_every=steps_per_epoch if eval_fn else 0,
                   early_stopping=early, writer=writer, log_every=steps_per_epoch,
                   progress=progress, desc=f"SWIFT head ({cfg.loss})")
    best = jax.tree.map(np.asarray, res.best_params)
    if moments is not None:
        best = fold_standardization(best, *moments)
    info = {"history": res.history, "best_step": res.best_step, "best_val_loss": res.best_metric,
            "epochs_run": res.steps / max(steps_per_epoch, 1), "stopped_early": res.stopped_early,
            "n_train_groups": int(len(g_train)), "n_val_groups": int(len(g_val)),
            "num_params": swift.num_params(best)}
    return best, info


_score = jax.jit(swift.score)


def _float32(features):
    """The identity transform of a source read as it is (bf16 store values included), as float32."""
    return features.astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _sums_with(transform):
    def sums(features, mask, shift):
        x = (transform or _float32)(features)
        m = mask.astype(jnp.float32)[..., None]
        x = jnp.where(m > 0, x - shift, 0.0)
        return jnp.sum(x, axis=(0, 1)), jnp.sum(x * x, axis=(0, 1)), jnp.sum(m)

    return jax.jit(sums)


def feature_moments(source, rows, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], standard deviation [F]) of each feature over the response tokens (mask 1) of
    ``rows`` of ``source``, after ``transform`` (a JAX function of [B, T, F], e.g. a norm). The
    sums are of the values less the first batch's mean (no cancellation for features whose mean
    dwarfs their spread), per batch in float32, added in float64. A constant feature gets
    deviation 1."""
    rows = np.asarray(rows)
    n = score_batch_rows(source)
    s1 = s2 = 0.0
    count = 0.0
    shift = None
    fn = _sums_with(transform)
    for a in range(0, len(rows), n):
        f, m = source.batch(rows[a:a + n], pad_to=_pad_width(source, rows[a:a + n]), **_bf16_kw(source, True))
        f, m = jnp.asarray(f), jnp.asarray(m)
        if shift is None:
            x1, _, c = fn(f, m, jnp.zeros((source.feature_dim,), jnp.float32))
            if float(c) < 1:
                continue
            shift = np.asarray(x1, np.float64) / float(c)
        x1, x2, c = fn(f, m, jnp.asarray(shift, jnp.float32))
        s1 = s1 + np.asarray(x1, np.float64)
        s2 = s2 + np.asarray(x2, np.float64)
        count += float(c)
    if count < 1:
        raise ValueError("feature_moments: expected rows with at least one response token (mask 1), got none")
    d = s1 / count
    sd = np.sqrt(np.maximum(s2 / count - d * d, 0.0))
    mean = np.asarray(shift, np.float32).astype(np.float64) + d
    return mean.astype(np.float32), np.where(sd > 1e-6 * np.maximum(np.abs(mean), 1.0), sd, 1.0).astype(np.float32)


def _standardizer(transform, mean, sd):
    mean, sd = jnp.asarray(mean), jnp.asarray(sd)

    def standardize(features):
        return ((transform or _float32)(features) - mean) / sd

    return standardize


def fold_standardization(params, mean, sd) -> dict:
    """A head on standardized features ``(x - mean) / sd`` as the same head on raw ``x``:
    kernel / sd (per input row), bias - (mean / sd) @ kernel."""
    k = np.asarray(params["kernel"], np.float64)
    z = np.asarray(mean, np.float64) / np.asarray(sd, np.float64)
    return {"kernel": (k / np.asarray(sd, np.float64)[:, None]).astype(np.float32),
            "bias": (np.asarray(params["bias"], np.float64) - z @ k).astype(np.float32)}


@functools.lru_cache(maxsize=16)
def _score_with(transform):
    return jax.jit(lambda params, features, mask: swift.score(params, transform(features), mask))


SCORE_BATCH_BYTES = 512 << 20  # float32 feature bytes of one scoring batch at the source's max_len


def score_batch_rows(source, cap: int = 256) -> int:
    """Rows per scoring batch: ``cap``, or fewer when that many rows of ``source`` at its
    ``max_len`` would exceed :data:`SCORE_BATCH_BYTES` as float32 (256 rows of the all-layer
    features of a 0.5B model at 512 tokens would be 11.7 GB; this keeps one batch near 0.5 GB)."""
    per_row = max(1, int(source.max_len) * int(source.feature_dim) * 4)
    return int(max(1, min(cap, SCORE_BATCH_BYTES // per_row)))


def score_rows(params, source, rows, batch_size: int | None = None) -> np.ndarray:
    """SWIFT scores of the given rows of a feature source (the stored-feature path), in
    batches of ``batch_size`` rows (default: :func:`score_batch_rows`, bounded by memory)."""
    source, transform = device_split(source)
    return _score_rows(params, source, rows, transform, batch_size)


def _score_rows(params, source, rows, transform, batch_size: int | None = None) -> np.ndarray:
    rows = np.asarray(rows)
    batch_size = score_batch_rows(source) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    fn = _score if transform is None else _score_with(transform)
    out = []
    for s in range(0, len(rows), batch_size):
        f, m = source.batch(rows[s:s + batch_size], pad_to=_pad_width(source, rows[s:s + batch_size]),
                            **_bf16_kw(source, True))
        out.append(np.asarray(fn(params, jnp.asarray(f), jnp.asarray(m))))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


__all__ = ["SwiftTrainConfig", "ArraySource", "LayerView", "device_split", "split_groups", "train_head",
           "score_rows", "score_batch_rows", "feature_moments", "fold_standardization"]
