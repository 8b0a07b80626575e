"""Inference and fine-tuning of whole models on a device mesh, from one config section.

``mesh: {data: 4, model: 2}`` in any command's config puts the backbone's parameters on a
``('data', 'model')`` mesh (:mod:`swiftjax.train.mesh`): tensor parallel over attention heads,
FFN units and the vocabulary along ``model``, and (``fsdp: true``, the default) the other
dimension of each large weight along ``data``. Batches and the KV cache are split along
``data`` (the cache also along KV heads on ``model``) by sharding constraints inside the
forward, so the same jitted functions run on one device unchanged: without a mesh the
constraints are no-ops.

Use::

    mesh = MeshConfig(data=4, model=2)
    with use_mesh(mesh) as m:                    # None when the config asks for one device
        model = shard_model(model, m)            # parameters placed by MODEL_RULES
        out = generate(model, ids, mask, ...)    # cache and activations follow the constraints

All constraints go through :func:`constrain`, which names logical axes ('batch', 'kv_heads',
...) and maps them to mesh axes by :data:`MODEL_RULES`; a dimension the mesh axis does not
divide stays unsplit, so odd batch sizes still run (replicated along that axis).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from swiftjax.train import mesh as M

__all__ = ["MeshConfig", "MODEL_RULES", "model_rules", "use_mesh", "current_mesh", "current_fsdp", "constrain", "shard_model",
           "shard_tree", "model_param_specs"]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a command. ``data`` x ``model`` devices (both 1: one device, no mesh).
    ``fsdp``: also split each large weight's non-parallel dimension along ``data`` (memory /
    data-size per device; XLA gathers it layer by layer); false keeps weights replicated
    across ``data``."""

    data: int = 1
    model: int = 1
    fsdp: bool = True

    def __post_init__(self):
        for name in ("data", "model"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mesh.{name}: expected a positive int, got {v!r}")

    @property
    def devices(self) -> int:
        return self.data * self.model

    @property
    def active(self) -> bool:
        return self.devices > 1

    def build(self):
        """The :class:`jax.sharding.Mesh` over this host's devices, or None for one device.
        On a pod every host builds its own (each samples and scores its own share of the
        problems, :func:`swiftjax.sample.candidate_set`). Refuses a mesh larger than the
        devices present (one line naming both)."""
        if not self.active:
            return None
        devs = jax.local_devices()
        if self.devices > len(devs):
            raise ValueError(f"mesh: expected data*model <= {len(devs)} devices ({jax.default_backend()}), got "
                             f"data={self.data} model={self.model}")
        return M.make_mesh(self.data, self.model, devices=devs)


def model_rules(fsdp: bool = True) -> M.ShardingRules:
    """Logical layouts of the ports' parameters (HF names, ``[out, in]`` Linear weights; GPT-2's
    ``Conv1D`` weights are ``[in, out]``). Norms, biases of small size and anything unmatched are
    replicated."""
    out_in = ("par", "embed")   # q/k/v, gate/up, vocab rows: output split over 'model'
    in_out = ("embed", "par")   # o_proj / down_proj: input split over 'model'
    return M.ShardingRules(
        logical_axes=(("batch", M.DATA), ("par", M.MODEL), ("kv_heads", M.MODEL),
                      ("embed", M.DATA if fsdp else None), ("seq", None)),
        param_axes=(
            (r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj)/weight(/value)?$", out_in),
            (r"(o_proj|down_proj)/weight(/value)?$", in_out),
            (r"(embed_tokens|lm_head)/weight(/value)?$", out_in),
            # GPT-2: Conv1D [in, out]; its c_proj (attention and MLP) contracts the split dimension
            (r"(c_attn|c_fc)/weight(/value)?$", in_out),
            (r"c_proj/weight(/value)?$", out_in),
            (r"wte/weight(/value)?$", out_in),
            (r"wpe/weight(/value)?$", ("seq", "embed")),  # learned positions: FSDP only
        ),
        fsdp_axis=None,
    )


MODEL_RULES = model_rules(True)

_STACK: list = []  # the concrete meshes of enclosing use_mesh blocks


@contextlib.contextmanager
def use_mesh(cfg: MeshConfig | None) -> Iterator:
    """Enter ``cfg``'s mesh (``jax.set_mesh``) for the block; yields it, or None (and changes
    nothing) when ``cfg`` asks for one device."""
    mesh = None if cfg is None else cfg.build()
    if mesh is None:
        yield None
        return
    _STACK.append((mesh, cfg))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _STACK.pop()


def current_mesh():
    """The mesh of the innermost :func:`use_mesh` block, or None."""
    return _STACK[-1][0] if _STACK else None


def current_fsdp() -> bool:
    """The innermost :func:`use_mesh` block's ``fsdp`` (True outside any)."""
    return _STACK[-1][1].fsdp if _STACK else True


def _current_rules() -> M.ShardingRules:
    return model_rules(current_fsdp())


def _spec(shape, logical, sizes) -> P:
    rules = _current_rules()
    out, used = [], set()
    for dim, name in zip(shape, logical):
        axis = rules.mesh_axis(name)
        if axis is None or axis in used or axis not in sizes or sizes[axis] == 1 or dim % sizes[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return P(*out)


def constrain(x, *logical):
    """``x`` with a sharding constraint on the ambient mesh (None, 'batch', 'kv_heads', ... per
    dimension); a no-op outside :func:`use_mesh` or when no dimension can be split."""
    if not _STACK or x is None:
        return x
    mesh = _STACK[-1][0]
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: expected {x.ndim} logical names for shape {x.shape}, got {logical}")
    spec = _spec(x.shape, logical, dict(mesh.shape))
    if all(a is None for a in spec):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def model_param_specs(state, mesh, fsdp: bool = True):
    """PartitionSpecs of an NNX state (or any tree with HF-named paths) under :func:`model_rules`."""
    return M.param_specs(state, mesh, model_rules(fsdp))


def shard_tree(tree, mesh, fsdp: bool = True):
    """``tree`` (parameters by HF-named paths) placed on ``mesh``."""
    specs = model_param_specs(tree, mesh, fsdp)
    return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def shard_model(model, mesh, fsdp: bool | None = None):
    """``model``'s parameters moved onto ``mesh`` in place (returns ``model``); no-op for None."""
    if mesh is None:
        return model
    if fsdp is None:
        fsdp = current_fsdp()
    state = nnx.state(model)
    nnx.update(model, shard_tree(state, mesh, fsdp))
    return model
