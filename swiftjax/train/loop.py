"""The generic optax training loop every method uses.

Pieces, smallest first:

* :class:`TrainState` – a pytree dataclass ``(params, opt_state, step, rng, frozen)``. ``params``
  is any pytree (a dict for a SWIFT head, an ``nnx.State`` of trainable variables for a model);
  ``frozen`` is an optional pytree that is passed to the loss but never differentiated, never
  updated and never checkpointed by :func:`fit` (the base model's weights, the non-LoRA part of
  an NNX model).
* :class:`OptimizerConfig` -> :func:`make_optimizer` (AdamW / RMSprop / SGD, linear warm-up then
  cosine decay or constant, optional global-norm clipping, optional gradient accumulation with
  ``optax.MultiSteps``) and :func:`learning_rate_fn`.
* :func:`make_train_step` – a pure, jitted ``train_step(state, batch) -> (state, metrics)`` with
  the state's buffers donated, around the user's ``loss_fn(params, batch, rng) -> (loss, aux)``
  (``loss_fn(params, batch, rng, frozen)`` when ``state.frozen`` is not None). The same step runs
  on one device or on a mesh (sharded inputs; see :mod:`swiftjax.train.mesh`).
* :func:`fit` – epochs or max steps over batches, periodic evaluation, early stopping keeping
  a copy of the best params, tqdm bar, jsonl metrics, orbax checkpoints and resume.
* :func:`nnx_split` / :func:`nnx_loss` – adapters for a Flax NNX module: train the variables a
  filter selects (``nnx.Param``, ``nnx.LoRAParam``, ...) and keep the rest frozen.

Determinism: all randomness comes from ``state.rng`` (split once per step), so the same seed,
data order and devices give bit-identical runs, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from swiftjax.train.distributed import is_main_process

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


# --------------------------------------------------------------------------- state
@flax.struct.dataclass
class TrainState:
    """params: trainable pytree; opt_state: optax state; step: int32 []; rng: uint32 [2] raw key;
    frozen: pytree handed to the loss, not trained (or None)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    frozen: Any = None


def _as_raw_key(rng) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    if isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"rng: expected a single key, got a key array of shape {rng.shape}")
        return jax.random.key_data(rng)
    arr = jnp.asarray(rng)
    if arr.shape != (2,) or arr.dtype != jnp.uint32:
        raise ValueError(
            f"rng: expected an int seed, a typed key or a uint32 [2] key, got {arr.dtype} {arr.shape}"
        )
    return arr


def init_state(params: Any, tx: optax.GradientTransformation, rng, frozen: Any = None) -> TrainState:
    """A fresh :class:`TrainState`: ``tx.init(params)``, step 0, ``rng`` (int seed or key).

    ``tx.init`` runs eagerly, so optimizer moments inherit the shardings of sharded ``params``.
    Inside a :func:`swiftjax.parallel.use_mesh` block ``params`` and ``frozen`` are first placed
    on that mesh by :data:`swiftjax.parallel.MODEL_RULES` (a model fine-tuned on a mesh).
    The state takes ``params``' buffers as they are and the train step donates them: after
    the first step the JAX arrays passed here are deleted (numpy arrays are copied, so they
    survive); copy first (``jax.tree.map(jnp.copy, params)``) to keep using them.
    """
    if not jax.tree.leaves(params):
        raise ValueError("params: expected a pytree with at least one array, got an empty tree")
    from swiftjax import parallel  # inside a `parallel.use_mesh` block: weights by the model rules

    mesh = parallel.current_mesh()
    if mesh is not None:
        params = parallel.shard_tree(params, mesh, parallel.current_fsdp())
        frozen = None if frozen is None else parallel.shard_tree(frozen, mesh, parallel.current_fsdp())
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=_as_raw_key(rng),
        frozen=frozen,
    )


# ----------------------------------------------------------------------- optimizer
_OPTIMIZERS = ("adamw", "rmsprop", "sgd")
_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer recipe. Steps count optimizer updates (after accumulation).

    name: 'adamw' | 'rmsprop' | 'sgd'. schedule: 'constant' | 'cosine' (needs ``total_steps``);
    both start with ``warmup_steps`` of linear warm-up from 0. ``final_lr_ratio``: cosine's end
    value as a fraction of ``lr``. ``clip_norm``: clip_by_global_norm threshold (None = off).
    ``accum_steps`` > 1 wraps the optimizer in ``optax.MultiSteps`` (gradients averaged over
    that many micro-batches per update). RMSprop follows torch: ``weight_decay`` is an L2 term
    added to the gradient, ``rms_decay`` is torch's alpha; AdamW's decay is decoupled.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr_ratio: float = 0.0
    clip_norm: float | None = None
    accum_steps: int = 1
    rms_decay: float = 0.99
    momentum: float | None = None
    centered: bool = False

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"optimizer name: expected one of {_OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule: expected one of {_SCHEDULES}, got {self.schedule!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.accum_steps, int) or self.accum_steps < 1:
            raise ValueError(f"accum_steps: expected an integer >= 1, got {self.accum_steps!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm: expected a number > 0 or None, got {self.clip_norm!r}")
        if self.schedule == "cosine":
            if not isinstance(self.total_steps, int) or self.total_steps <= self.warmup_steps:
                raise ValueError(
                    "total_steps: cosine schedule expects an integer > warmup_steps "
                    f"({self.warmup_steps}), got {self.total_steps!r}"
                )
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio: expected a value in [0, 1], got {self.final_lr_ratio!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OptimizerConfig":
        """Build from a config mapping; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"optimizer config: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**dict(d))


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count.

    constant: ``lr * min(1, s / W)``; cosine: the same warm-up, then
    ``end + (lr - end) * (1 + cos(pi * min(s - W, D) / D)) / 2`` with ``D = total - W``,
    ``end = lr * final_lr_ratio``.
    """
    lr, w = float(cfg.lr), cfg.warmup_steps
    if cfg.schedule == "constant":
        if w == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, w), optax.constant_schedule(lr)], [w]
        )
    end = lr * float(cfg.final_lr_ratio)
    if w == 0:
        return optax.cosine_decay_schedule(lr, cfg.total_steps, alpha=float(cfg.final_lr_ratio))
    return optax.warmup_cosine_decay_schedule(0.0, lr, w, cfg.total_steps, end_value=end)


def learning_rate_fn(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of the train-step (micro-batch) count ``state.step``."""
    sched = make_schedule(cfg)
    k = cfg.accum_steps
    return sched if k == 1 else (lambda step: sched(step // k))


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """optax transformation for ``cfg``: chain(clip, optimizer) [wrapped in MultiSteps]."""
    sched = make_schedule(cfg)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    if cfg.name == "adamw":
        parts.append(
            optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
        )
    elif cfg.name == "rmsprop":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(
            optax.rmsprop(
                sched, decay=cfg.rms_decay, eps=cfg.eps, eps_in_sqrt=False,
                momentum=cfg.momentum, centered=cfg.centered,
            )
        )
    else:  # sgd
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.sgd(sched, momentum=cfg.momentum))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx


# ---------------------------------------------------------------------- train step
def train_step_fn(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The pure (un-jitted) step. ``axis_name``: average gradients, loss and aux metrics over
    that mapped axis with ``lax.pmean`` (the pmap path); None on one device or a mesh.

    metrics: ``loss``, ``grad_norm`` (global norm of the gradient), the loss's aux metrics and,
    when ``lr_fn`` is given, ``lr`` (the rate used by this step).
    """

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        rng, sub = jax.random.split(state.rng)
        if state.frozen is None:
            def f(p):
                return loss_fn(p, batch, sub)
        else:
            def f(p):
                return loss_fn(p, batch, sub, state.frozen)
        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        aux = dict(aux or {})
        if axis_name is not None:
            grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if lr_fn is not None:
            metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        new = state.replace(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)
        return new, metrics

    return step


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
    donate: bool = True,
    state_sharding: Any = None,
    batch_sharding: Any = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Jitted ``train_step(state, batch) -> (state, metrics)``; the input state is donated,
    except ``state.frozen``, which is passed through untouched (callers keep using it, e.g. an
    eval function built on the same frozen weights).

    On a mesh, pass sharded inputs (:func:`swiftjax.train.mesh.shard_state` /
    ``shard_batch``) and, to pin the layout of the updated state, ``state_sharding`` (e.g.
    ``mesh.shardings_of(state)``) and ``batch_sharding``: they become jit's in/out shardings.
    Without them the partitioner propagates the inputs' shardings.
    """
    step = train_step_fn(loss_fn, tx, lr_fn=lr_fn)

    def split_step(trained, frozen, batch):
        from swiftjax import parallel  # rows split over a `parallel.use_mesh` mesh's 'data' axis

        batch = jax.tree.map(lambda x: parallel.constrain(x, "batch", *(None,) * (x.ndim - 1)) if x.ndim else x,
                             batch)
        new, metrics = step(trained.replace(frozen=frozen), batch)
        return new.replace(frozen=None), metrics

    kw: dict = {"donate_argnums": (0,) if donate else ()}
    if state_sharding is not None or batch_sharding is not None:
        trained_sharding = None if state_sharding is None else state_sharding.replace(frozen=None)
        frozen_sharding = None if state_sharding is None else state_sharding.frozen
        kw["in_shardings"] = (trained_sharding, frozen_sharding, batch_sharding)
        kw["out_shardings"] = (trained_sharding, None)
    jitted = jax.jit(split_step, **kw)

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        new, metrics = jitted(state.replace(frozen=None), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics

    return train_step


# ----------------------------------------------------------------------------- eval
def make_eval_fn(
    metric_fn: Callable[..., Mapping[str, jax.Array]],
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    frozen: Any = None,
) -> Callable[[Any], dict]:
    """``eval_fn(params) -> {name: float}``: the mean over ``batches`` of the jitted
    ``metric_fn(params, batch)`` (``metric_fn(params, batch, frozen)`` when ``frozen`` is given).
    ``batches`` is a re-iterable (list) or a zero-argument callable returning an iterable."""
    jitted = jax.jit(metric_fn)

    def eval_fn(params) -> dict:
        sums: dict[str, float] = {}
        n = 0
        for batch in (batches() if callable(batches) else batches):
            out = jitted(params, batch) if frozen is None else jitted(params, batch, frozen)
            for k, v in jax.device_get(dict(out)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        if n == 0:
            raise ValueError("eval batches: expected at least one batch, got none")
        return {k: v / n for k, v in sums.items()}

    return eval_fn


# ------------------------------------------------------------------------------ fit
@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Track ``metric`` of the eval results; keep the best params; stop after ``patience``
    evaluations without an improvement larger than ``min_delta`` (``patience=None``: track the
    best but never stop)."""

    metric: str = "loss"
    mode: str = "min"
    patience: int | None = 5
    min_delta: float = 0.0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"early stopping mode: expected 'min' or 'max', got {self.mode!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"patience: expected an integer >= 1 or None, got {self.patience!r}")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta


@dataclasses.dataclass
class FitResult:
    """state: the final TrainState; best_params: copy of the params with the best eval metric
    (the final params when no early stopping is configured); history: eval records."""

    state: TrainState
    best_params: Any
    best_metric: float | None
    best_step: int | None
    history: list
    stopped_early: bool
    steps: int


_copy_tree = jax.jit(lambda t: jax.tree.map(jnp.copy, t))


def _host_scalars(metrics: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in jax.device_get(dict(metrics)).items():
        a = np.asarray(v)
        out[k] = float(a) if a.size == 1 else a.tolist()
    return out


def _payload(state: TrainState, best_params: Any) -> dict:
    p = {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}
    if best_params is not None:
        p["best_params"] = best_params
    return p


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    *,
    max_steps: int | None = None,
    epochs: int | None = None,
    eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    early_stopping: EarlyStopping | None = None,
    checkpointer=None,
    ckpt_every: int = 0,
    resume: bool = True,
    writer=None,
    log_every: int = 1,
    progress: bool = True,
    desc: str = "train",
    meta: Mapping[str, Any] | None = None,
) -> FitResult:
    """Run ``train_step`` over ``batches`` until ``epochs`` or ``max_steps`` (whichever first).

    batches: a callable ``epoch -> iterable of batches`` (deterministic per epoch, e.g. seeded
    by the epoch: needed for exact resume) or a re-iterable such as a list; a one-shot iterator
    works with ``max_steps`` and ends training when exhausted.
    eval_fn(params) -> {name: value}: run every ``eval_every`` steps and after the last step.
    early_stopping: see :class:`EarlyStopping`; requires ``eval_fn``.
    checkpointer: a :class:`swiftjax.train.ckpt.Checkpointer`; saves every ``ckpt_every`` steps
    and at the end (params, opt_state, step, rng, best params; never ``state.frozen``). With
    ``resume`` the latest readable checkpoint is restored first and the data position is
    skipped forward, so the result equals an uninterrupted run.
    writer: a metrics writer (``write(step, dict)``); train metrics every ``log_every`` steps
    with ``split='train'``, eval results with ``split='eval'``.
    """
    if max_steps is None and epochs is None:
        raise ValueError("fit: expected max_steps or epochs (or both), got neither")
    for name, v in (("max_steps", max_steps), ("epochs", epochs)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 0):
            raise ValueError(f"{name}: expected an integer >= 0 or None, got {v!r}")
    for name, v in (("eval_every", eval_every), ("ckpt_every", ckpt_every), ("log_every", log_every)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
    if early_stopping is not None and eval_fn is None:
        raise ValueError("early_stopping: expected an eval_fn to read the metric from, got none")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every: expected an eval_fn, got none")

    tracking = early_stopping is not None
    best_params = _copy_tree(state.params) if tracking else None
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals = 0
    history: list = []
    start_epoch, skip = 0, 0
    stopped = False

    if checkpointer is not None and resume:
        restored = checkpointer.restore(_payload(state, best_params))
        if restored is not None:
            p, m = restored.state, restored.meta
            state = state.replace(
                params=p["params"], opt_state=p["opt_state"], step=p["step"], rng=p["rng"]
            )
            if tracking:
                best_params = p["best_params"]
            best_metric, best_step = m.get("best_metric"), m.get("best_step")
            bad_evals = int(m.get("bad_evals", 0))
            history = list(m.get("history", []))
            start_epoch, skip = int(m.get("epoch", 0)), int(m.get("batch_in_epoch", 0))
            stopped = bool(m.get("stopped_early", False))

    step = int(jax.device_get(state.step))
    total = max_steps
    if total is None and hasattr(batches, "__len__") and epochs is not None:
        total = epochs * len(batches)  # type: ignore[arg-type]
    main = is_main_process()
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(step, total) if total else step, desc=desc, leave=False)

    last_eval = history[-1]["step"] if history else None
    last_ckpt = step if (checkpointer is not None and checkpointer.latest_step() == step) else None
    epoch = start_epoch

    def do_eval() -> bool:
        nonlocal best_params, best_metric, best_step, bad_evals, last_eval
        res = {k: float(v) for k, v in dict(eval_fn(state.params)).items()}
        last_eval = step
        rec = {"step": step, **res}
        history.append(rec)
        if writer is not None:
            writer.write(step, {"split": "eval", **res})
        if not tracking:
            return False
        if early_stopping.metric not in res:
            raise ValueError(
                f"early stopping metric: expected {early_stopping.metric!r} among the eval "
                f"results, got {sorted(res)}"
            )
        value = res[early_stopping.metric]
        if early_stopping.improved(value, best_metric):
            best_metric, best_step, bad_evals = value, step, 0
            best_params = _copy_tree(state.params)
        else:
            bad_evals += 1
        return early_stopping.patience is not None and bad_evals >= early_stopping.patience

    def do_ckpt(ep: int, pos: int) -> None:
        nonlocal last_ckpt
        info = {
            "step": step, "epoch": ep, "batch_in_epoch": pos, "best_metric": best_metric,
            "best_step": best_step, "bad_evals": bad_evals, "history": history,
            "stopped_early": stopped,
            "user": dict(meta or {}),
        }
        checkpointer.save(step, _payload(state, best_params), info)
        last_ckpt = step

    def reached() -> bool:
        return max_steps is not None and step >= max_steps

    where = (start_epoch, skip)  # data position of the next batch: (epoch, index in epoch)
    while not stopped and not reached() and (epochs is None or epoch < epochs):
        pos = 0
        for batch in batches(epoch) if callable(batches) else batches:
            if pos < skip:
                pos += 1
                continue
            state, metrics = train_step(state, batch)
            step += 1
            pos += 1
            where = (epoch, pos)
            if writer is not None and log_every and step % log_every == 0:
                host = _host_scalars(metrics)
                writer.write(step, {"split": "train", **host})
                if bar is not None:
                    bar.set_postfix(loss=f"{host.get('loss', float('nan')):.4g}", refresh=False)
            if bar is not None:
                bar.update(1)
            if eval_every and step % eval_every == 0:
                stopped = do_eval()
            if checkpointer is not None and ckpt_every and step % ckpt_every == 0:
                do_ckpt(*where)
            if stopped or reached():
                break
        else:
            if pos == 0:  # the batches yielded nothing: an exhausted iterator
                break
            epoch, skip = epoch + 1, 0
            where = (epoch, 0)
            continue
        break  # left the for loop early: stopping or max_steps
    if eval_fn is not None and last_eval != step:
        stopped = do_eval() or stopped
    if checkpointer is not None:
        if last_ckpt != step:
            do_ckpt(*where)
        checkpointer.wait_until_finished()
    if bar is not None:
        bar.close()
    return FitResult(
        state=state,
        best_params=best_params if tracking else state.params,
        best_metric=best_metric,
        best_step=best_step,
        history=history,
        stopped_early=bool(stopped),
        steps=step,
    )


# ----------------------------------------------------------------------- Flax NNX
def nnx_split(model, wrt: Any = None):
    """Split an ``nnx.Module`` into ``(graphdef, trainable, frozen)``.

    ``wrt``: the filter of variables to train (default ``nnx.Param``; e.g. ``nnx.LoRAParam``
    to train only LoRA adapters); everything else (other params, batch stats, rng counters)
    goes to ``frozen``. Train with ``init_state(trainable, tx, seed, frozen=frozen)`` and the
    loss from :func:`nnx_loss`.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: expected an nnx.Module, got {type(model).__name__}")
    wrt = nnx.Param if wrt is None else wrt
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"wrt: the filter {wrt!r} selects no variable of {type(model).__name__}")
    return graphdef, trainable, frozen


def nnx_merge(graphdef, trainable, frozen):
    """The module back from :func:`nnx_split`'s parts (e.g. the best params after training)."""
    from flax import nnx

    return nnx.merge(graphdef, trainable, frozen)


def nnx_loss(graphdef, fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping]]) -> LossFn:
    """Adapt ``fn(model, batch, rng) -> (loss, aux)`` to the loop's
    ``loss_fn(params, batch, rng, frozen)``: the module is rebuilt from the trainable and
    frozen states inside the traced step (so only ``params`` is differentiated)."""

    def loss_fn(params, batch, rng, frozen):
        return fn(nnx_merge(graphdef, params, frozen), batch, rng)

    return loss_fn
