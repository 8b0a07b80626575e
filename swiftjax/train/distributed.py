"""Multi-host set-up: ``jax.distributed`` initialisation, per-host data shards, main process.

On a TPU pod slice every worker runs the same command; JAX finds its peers by itself, so
:func:`maybe_initialize` with no arguments (and ``SWIFTJAX_DISTRIBUTED=auto`` in the
environment, which ``tpu_scripts/pod.py run`` sets) is all a script needs. On a GPU cluster
pass the coordinator explicitly, or set ``SWIFTJAX_COORDINATOR`` (``host:port``),
``SWIFTJAX_NUM_PROCESSES`` and ``SWIFTJAX_PROCESS_ID`` on every process.

Everything here takes the process index/count as optional arguments so that tests (and
tools that plan shards for other hosts) can ask "what would host 3 of 8 get" on one machine.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

ENV_COORDINATOR = "SWIFTJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SWIFTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SWIFTJAX_PROCESS_ID"
ENV_AUTO = "SWIFTJAX_DISTRIBUTED"  # "auto": let jax detect the cluster (TPU pods, SLURM, ...)


def _env_int(name: str, env) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def resolve_distributed_args(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env=None,
) -> dict | None:
    """The keyword arguments :func:`maybe_initialize` would pass to ``jax.distributed.initialize``.

    Arguments win over the environment (``SWIFTJAX_COORDINATOR``, ``SWIFTJAX_NUM_PROCESSES``,
    ``SWIFTJAX_PROCESS_ID``; ``SWIFTJAX_DISTRIBUTED=auto`` asks for auto-detection). Returns
    ``None`` for a single-process run, ``{}`` for auto-detection, or a dict with
    ``coordinator_address``, ``num_processes`` and ``process_id``.
    """
    env = os.environ if env is None else env
    coordinator = coordinator if coordinator is not None else (env.get(ENV_COORDINATOR) or None)
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES, env)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID, env)
    if coordinator is None and num_processes is None and process_id is None:
        if str(env.get(ENV_AUTO, "")).lower() in ("1", "auto", "true", "yes"):
            return {}
        return None
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            "distributed set-up: expected coordinator, num_processes and process_id together "
            f"(args or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}), got "
            f"coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}"
        )
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator: expected 'host:port', got {coordinator!r}")
    if not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise ValueError(f"num_processes: expected an integer >= 1, got {num_processes!r}")
    if not isinstance(process_id, (int, np.integer)) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id: expected an integer in [0, {num_processes}), got {process_id!r}"
        )
    return {
        "coordinator_address": str(coordinator),
        "num_processes": int(num_processes),
        "process_id": int(process_id),
    }


def maybe_initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> bool:
    """Call ``jax.distributed.initialize`` when this is a multi-process run; return whether it did.

    Must run before anything touches a JAX device. A single-process run (no arguments, no
    ``SWIFTJAX_*`` variables) does nothing and returns ``False``; calling again after a
    successful initialisation is a no-op returning ``True``. ``kwargs`` go to
    ``jax.distributed.initialize`` (e.g. ``local_device_ids``).
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    args = resolve_distributed_args(coordinator, num_processes, process_id)
    if args is None:
        return False
    jax.distributed.initialize(**args, **kwargs)
    return True


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count: expected an integer >= 1, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index: expected an integer in [0, {process_count}), got {process_index!r}"
        )
    return int(process_index), int(process_count)


def host_shard(
    dataset_indices: Sequence[int] | np.ndarray | int,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    drop_remainder: bool = True,
) -> np.ndarray:
    """The slice of ``dataset_indices`` [N] this host reads: a contiguous block, [N // P].

    ``dataset_indices`` is a 1-D sequence (or an int ``N``, meaning ``arange(N)``); shuffle it
    with the same seed on every host before sharding. With ``drop_remainder`` (the default)
    every host gets exactly ``N // P`` items, so all hosts run the same number of steps (a host
    with one more batch would hang in a collective); otherwise the first ``N % P`` hosts get one
    extra item. Hosts never overlap and, without dropping, together cover every index once.
    ``process_index``/``process_count`` default to ``jax.process_index()/process_count()``.
    """
    idx = np.arange(dataset_indices) if isinstance(dataset_indices, (int, np.integer)) else (
        np.asarray(dataset_indices)
    )
    if idx.ndim != 1:
        raise ValueError(f"dataset_indices: expected shape [N] (1-D), got shape {idx.shape}")
    i, p = _process(process_index, process_count)
    n = idx.shape[0]
    if drop_remainder:
        per = n // p
        return idx[i * per : (i + 1) * per]
    base, extra = divmod(n, p)
    start = i * base + min(i, extra)
    return idx[start : start + base + (1 if i < extra else 0)]


def is_main_process(process_index: int | None = None) -> bool:
    """True on process 0 (the one that writes logs, plots and copies results)."""
    if process_index is None:
        import jax

        process_index = jax.process_index()
    return int(process_index) == 0
