"""Checkpoints through orbax's ``CheckpointManager``: save, restore the latest good step, resume.

A checkpoint is two items: ``state`` (any pytree of arrays, saved with ``StandardSave``) and
``meta`` (a JSON dict, ``JsonSave``). Saves are asynchronous and atomic: orbax writes into a
``<step>.orbax-checkpoint-tmp-*`` folder and renames it when complete, so a run killed while
saving leaves at worst a temporary folder, which is never loaded.

:meth:`Checkpointer.restore` walks the steps newest first; a step that fails to load
(truncated or missing files, bad JSON) is reported with a warning, moved aside to
``<directory>/_corrupt/`` (so a resumed run can save that step number again) and the previous
step is tried.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from swiftjax.train.distributed import is_main_process
from swiftjax.train.metrics import to_python

TMP_MARKER = "orbax-checkpoint-tmp"
CORRUPT_DIR = "_corrupt"


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns: the state pytree, the meta dict, the step."""

    state: Any
    meta: dict
    step: int


def abstract_like(target: Any) -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) describing ``target``; restoring into it puts
    every array back on the devices/shardings ``target`` has. Non-JAX leaves are first placed
    on the default device."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise ValueError(
                "checkpoint state: typed PRNG keys cannot be saved; store jax.random.key_data(key)"
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(one, target)


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a run under ``directory``.

    >>> ck = Checkpointer("/tmp/run/ckpt", max_to_keep=3)
    >>> ck.save(100, state, {"epoch": 1}); ck.wait_until_finished()
    >>> restored = ck.restore(state)     # Restored(state, meta, step) or None
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep: expected an integer >= 1 or None, got {max_to_keep!r}")
        self.directory = Path(directory).expanduser().absolute()
        self.max_to_keep = max_to_keep
        self._warned: set[Path] = set()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("state", "meta")
        )

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *, force: bool = True) -> bool:
        """Start saving ``state`` (pytree of arrays) and ``meta`` (JSON-able dict) as ``step``.

        Returns whether a save was started. The call returns once the arrays are copied off the
        devices, so the caller may donate/overwrite ``state`` right after; the files are written
        in the background (call :meth:`wait_until_finished` before reading them).
        """
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        meta = to_python(dict(meta or {}))
        return bool(
            self._mgr.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        )

    def wait_until_finished(self) -> None:
        self._mgr.wait_until_finished()

    # --------------------------------------------------------------- inspect
    def all_steps(self) -> list[int]:
        """Steps present on disk (complete, not necessarily readable), ascending."""
        self._mgr.reload()
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def partial_dirs(self) -> list[Path]:
        """Unfinished save folders (``*.orbax-checkpoint-tmp-*``) left by an interrupted run."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)

    # --------------------------------------------------------------- restore
    def restore(self, target: Any, step: int | None = None) -> Restored | None:
        """Load the newest readable checkpoint into the structure/shardings of ``target``.

        ``target`` is a pytree like the saved state (concrete arrays or ``ShapeDtypeStruct``).
        With ``step`` only that step is tried and its errors propagate. Without it, unreadable
        steps are skipped (warning, moved to ``_corrupt/``) and ``None`` is returned when no
        step can be read.
        """
        abstract = abstract_like(target)
        for tmp in self.partial_dirs():
            if tmp in self._warned:
                continue
            self._warned.add(tmp)
            warnings.warn(
                f"checkpoint: skipping partial (unfinished) save {tmp}", RuntimeWarning, stacklevel=2
            )
        if step is not None:
            return self._restore_step(int(step), abstract)
        for s in reversed(self.all_steps()):
            try:
                return self._restore_step(s, abstract)
            except Exception as e:  # corrupt or partial: fall back to the previous step
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} is unreadable and was skipped "
                    f"({type(e).__name__}: {str(e)[:200]})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._quarantine(s)
        return None

    def _restore_step(self, step: int, abstract: Any) -> Restored:
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"meta: expected a JSON object, got {type(meta).__name__}")
        state = out["state"]
        if jax.tree.structure(state) != jax.tree.structure(abstract):
            raise ValueError("state: restored tree structure differs from the target's")
        return Restored(state=state, meta=meta, step=step)

    def _quarantine(self, step: int) -> None:
        """Move an unreadable step folder out of the way so its step number can be saved again."""
        if not is_main_process():
            return
        src = self.directory / str(step)
        if src.exists():
            dst_root = self.directory / CORRUPT_DIR
            dst_root.mkdir(exist_ok=True)
            dst = dst_root / f"{step}-{time.time_ns()}"
            shutil.move(str(src), str(dst))
        self._mgr.reload()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
