"""Device meshes, sharding rules, and the pmap compatibility path.

The main path is ``jax.jit`` over arrays that carry ``NamedSharding``s on a 2-D mesh with axes
``('data', 'model')``. The same :func:`swiftjax.train.loop.make_train_step` runs on one device
and on a mesh: only the inputs differ (``shard_state`` / ``shard_batch``).

Axis types: :func:`make_mesh` defaults to ``AxisType.Auto``. With Auto axes the shardings of
the inputs are hints that XLA's partitioner propagates through the program, so a loss written
for one device (a matmul of a batch-sharded ``x`` with an FSDP-sharded weight, a mean over the
batch) compiles unchanged, inserting the all-gathers and reductions itself. With Explicit axes
shardings are part of every array's type and an op whose operand shardings conflict (e.g.
contracting a dimension that is sharded on one side only) is an error until the user code
annotates ``out_sharding`` or reshards, i.e. loss functions would need mesh-aware code.
``axis_types='explicit'`` is available for code written that way.

Sharding rules follow maxtext's idea of logical axes mapped to mesh axes by rules:
:class:`ShardingRules` maps logical names ('batch', 'embed', 'mlp', 'vocab', ...) to mesh
axes, lets a regex over a parameter's path name its logical axes, and otherwise applies an
FSDP-style default: a parameter with at least ``min_shard_size`` elements is split along
``fsdp_axis`` on its largest dimension divisible by that axis's size; smaller ones are
replicated. :data:`HEAD_RULES` (batch on 'data', params replicated) is for training heads over
features; :data:`BASE_MODEL_RULES` shards the large weights of a base model along 'model'.

The pmap path (:func:`make_pmap_train_step`) is a thin compatibility layer over the same step
function with ``lax.pmean`` of the gradients over the 'batch' axis; ``jax.pmap`` is in
maintenance mode, so it is kept for old pipelines and tested, never the main path.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from swiftjax.train.loop import TrainState, train_step_fn

DATA = "data"
MODEL = "model"
PMAP_AXIS = "batch"

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


# ------------------------------------------------------------------------- mesh
def make_mesh(
    data: int | None = None,
    model: int = 1,
    *,
    devices: Sequence[Any] | None = None,
    axis_types: str = "auto",
) -> Mesh:
    """A ``(data, model)`` mesh with axes named 'data' and 'model'.

    ``data=None`` uses every device: ``len(devices) // model``. When ``data * model`` is
    smaller than the number of devices the first ``data * model`` devices are used.
    ``axis_types``: 'auto' (default, see module doc) or 'explicit'.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not isinstance(model, (int, np.integer)) or model < 1:
        raise ValueError(f"model: expected an integer >= 1, got {model!r}")
    if data is None:
        if len(devs) % model:
            raise ValueError(f"model: expected a divisor of the device count {len(devs)}, got {model}")
        data = len(devs) // model
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ValueError(f"data: expected an integer >= 1, got {data!r}")
    if data * model > len(devs):
        raise ValueError(
            f"mesh: expected data*model <= {len(devs)} devices, got data={data} model={model}"
        )
    if axis_types not in _AXIS_TYPES:
        raise ValueError(f"axis_types: expected one of {sorted(_AXIS_TYPES)}, got {axis_types!r}")
    kind = _AXIS_TYPES[axis_types]
    return jax.make_mesh(
        (int(data), int(model)), (DATA, MODEL), axis_types=(kind, kind),
        devices=devs[: data * model],
    )


# ------------------------------------------------------------------------ rules
@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How arrays map onto the mesh.

    logical_axes: (logical name, mesh axis or None) pairs, e.g. ('mlp', 'model').
    param_axes: (regex, logical names per dimension) pairs; the first regex that matches a
      parameter's path ('layers/0/mlp/up/kernel') and has the right rank gives its layout.
    fsdp_axis: mesh axis for the size-based default (None: replicate unmatched params).
    min_shard_size: parameters with fewer elements are replicated.
    batch_axis: logical name of the leading batch dimension of inputs.
    """

    logical_axes: tuple[tuple[str, str | None], ...] = (("batch", DATA),)
    param_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    fsdp_axis: str | None = None
    min_shard_size: int = 1 << 16
    batch_axis: str = "batch"

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None:
            return None
        for name, axis in self.logical_axes:
            if name == logical:
                return axis
        raise ValueError(
            f"logical axis: expected one of {[n for n, _ in self.logical_axes]}, got {logical!r}"
        )


HEAD_RULES = ShardingRules()
BASE_MODEL_RULES = ShardingRules(
    logical_axes=(
        ("batch", DATA),
        ("vocab", MODEL),
        ("embed", None),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("kv", None),
        ("layers", None),
    ),
    fsdp_axis=MODEL,
)


def _mesh_shape(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def logical_to_spec(logical: Sequence[str | None], rules: ShardingRules, mesh=None) -> P:
    """PartitionSpec for an array whose dimensions have these logical names. A mesh axis used
    twice is kept on its first dimension only (a mesh axis can shard one dimension)."""
    used: set[str] = set()
    out = []
    for name in logical:
        axis = rules.mesh_axis(name)
        if axis is not None and (axis in used or (mesh is not None and axis not in _mesh_shape(mesh))):
            axis = None
        if axis is not None:
            used.add(axis)
        out.append(axis)
    return P(*out)


def path_str(path) -> str:
    """'a/b/0/kernel' for a pytree key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_spec(path: str, shape: Sequence[int], mesh, rules: ShardingRules) -> P:
    """The PartitionSpec of one parameter (see :class:`ShardingRules`). A dimension a rule
    would shard but that the mesh axis size does not divide stays unsharded."""
    sizes = _mesh_shape(mesh)
    shape = tuple(int(s) for s in shape)
    for pattern, logical in rules.param_axes:
        if re.search(pattern, path) and len(logical) == len(shape):
            spec = logical_to_spec(logical, rules, mesh)
            return P(*(a if a is None or shape[i] % sizes[a] == 0 else None for i, a in enumerate(spec)))
    axis = rules.fsdp_axis
    if axis is None or axis not in sizes or sizes[axis] == 1 or not shape:
        return P()
    if int(np.prod(shape)) < rules.min_shard_size:
        return P()
    n = sizes[axis]
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % n == 0:
            return P(*(axis if d == dim else None for d in range(len(shape))))
    return P()


def param_specs(params: Any, mesh, rules: ShardingRules = HEAD_RULES) -> Any:
    """Tree of PartitionSpecs for ``params`` (works with an ``AbstractMesh`` too)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: param_spec(path_str(p), np.shape(x), mesh, rules), params
    )


def param_shardings(params: Any, mesh: Mesh, rules: ShardingRules = HEAD_RULES) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules))


def shard_params(params: Any, mesh: Mesh, rules: ShardingRules = HEAD_RULES) -> Any:
    """``params`` placed on ``mesh`` by ``rules``."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf fully replicated over ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh, rules: ShardingRules = HEAD_RULES) -> NamedSharding:
    """Leading dimension split over the batch axis's mesh axis, the rest replicated."""
    return NamedSharding(mesh, P(rules.mesh_axis(rules.batch_axis)))


def shard_batch(batch: Any, mesh: Mesh, rules: ShardingRules = HEAD_RULES) -> Any:
    """Place a batch (pytree of [B, ...] arrays) with B split over the 'data' axis.

    Single process: ``batch`` is the global batch. Multi-process: ``batch`` is this host's
    part ([B / process_count, ...]) and the global array is assembled with
    ``jax.make_array_from_process_local_data``. B must be divisible by the axis size.
    """
    axis = rules.mesh_axis(rules.batch_axis)
    n = _mesh_shape(mesh)[axis] if axis is not None else 1
    sharding = batch_sharding(mesh, rules)
    multi = jax.process_count() > 1

    def one(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(f"batch/{path_str(path)}: expected shape [B, ...], got a scalar")
        b = x.shape[0] * (jax.process_count() if multi else 1)
        if b % n:
            raise ValueError(
                f"batch/{path_str(path)}: expected a batch size divisible by the '{axis}' axis "
                f"size {n}, got {b}"
            )
        if multi:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(one, batch)


def shard_state(
    state: TrainState,
    mesh: Mesh,
    rules: ShardingRules,
    tx: optax.GradientTransformation,
) -> TrainState:
    """``state`` placed on ``mesh``: params by ``rules``; the optimizer's per-parameter
    leaves (moments, accumulators) like their parameter; counters, step and rng replicated;
    ``frozen`` by ``rules`` too. Works for a fresh or a restored state."""
    p_sh = param_shardings(state.params, mesh, rules)
    rep = NamedSharding(mesh, P())
    o_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        state.opt_state,
        p_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    f_sh = None if state.frozen is None else param_shardings(state.frozen, mesh, rules)
    return TrainState(
        params=jax.device_put(state.params, p_sh),
        opt_state=jax.device_put(state.opt_state, o_sh),
        step=jax.device_put(state.step, rep),
        rng=jax.device_put(state.rng, rep),
        frozen=None if state.frozen is None else jax.device_put(state.frozen, f_sh),
    )


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every array leaf (for jit's in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, tree)


# ------------------------------------------------------------------------- pmap
def make_pmap_train_step(
    loss_fn,
    tx: optax.GradientTransformation,
    *,
    lr_fn: Callable | None = None,
    axis_name: str = PMAP_AXIS,
    donate: bool = True,
):
    """``jax.pmap`` version of the train step: state replicated ([n_dev] leading axis, see
    :func:`pmap_replicate`), batch split ([n_dev, B / n_dev, ...], see :func:`pmap_split`);
    gradients, loss and aux metrics are ``lax.pmean``-ed over ``axis_name``. Each device
    draws the same rng, so losses that use ``rng`` differ from the jit path; deterministic
    losses (head training) give the same results."""
    step = train_step_fn(loss_fn, tx, lr_fn=lr_fn, axis_name=axis_name)
    return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,) if donate else ())


def pmap_replicate(tree: Any, n_devices: int | None = None) -> Any:
    """Stack ``n_devices`` copies of every leaf: [n_dev, ...]."""
    n = jax.local_device_count() if n_devices is None else n_devices
    return jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * n), tree)


def pmap_unreplicate(tree: Any) -> Any:
    """The copy on the first device: [n_dev, ...] -> [...]."""
    return jax.tree.map(lambda x: x[0], tree)


def pmap_split(batch: Any, n_devices: int | None = None) -> Any:
    """[B, ...] -> [n_dev, B / n_dev, ...] (B must be divisible by n_dev)."""
    n = jax.local_device_count() if n_devices is None else n_devices

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"batch/{path_str(path)}: expected a leading batch size divisible by {n} "
                f"devices, got shape {x.shape}"
            )
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree_util.tree_map_with_path(one, batch)
