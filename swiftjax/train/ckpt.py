"""Checkpoints through orbax's ``CheckpointManager``: save, restore the latest good step, resume.

A checkpoint is two items: ``state`` (any pytree of arrays, saved with ``StandardSave``) and
``meta`` (a JSON dict, ``JsonSave``). Saves are asynchronous and atomic: orbax writes into a
``<step>.orbax-checkpoint-tmp-*`` folder and renames it when complete, so a run killed while
saving leaves at worst a temporary folder, which is never loaded.

Checksums. Once orbax has finished a step, the writer adds ``<step>/swiftjax_checksums.json``
(:data:`MANIFEST`) LAST: the sha256 and size of every other file of the step folder. A step
without it (killed before it was sealed) or whose files no longer match it (flipped bytes keep
the size) is not a good step.

:meth:`Checkpointer.restore` walks the steps newest first; a step that fails its checksums or
fails to load (truncated or missing files, bad JSON) is reported with a warning and skipped,
and the previous step is tried. Reading never moves or deletes anything: the writer owns the
directory, and :meth:`Checkpointer.save` moves a bad step it is about to save again aside to
``<directory>/_corrupt/``.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from swiftjax._io import file_sha256
from swiftjax.train.distributed import is_main_process
from swiftjax.train.metrics import to_python

TMP_MARKER = "orbax-checkpoint-tmp"
CORRUPT_DIR = "_corrupt"
MANIFEST = "swiftjax_checksums.json"


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


# ----------------------------------------------------------------------------- checksums


def step_files(step_dir: Path) -> list[str]:
    """Relative paths (posix) of every file of a step folder but the manifest, sorted."""
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(MANIFEST + "."))


def step_checksums(step_dir: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every file of a step folder but the manifest."""
    return {rel: {"sha256": file_sha256(step_dir / rel), "size": (step_dir / rel).stat().st_size}
            for rel in step_files(step_dir)}


def write_manifest(step_dir: Path) -> Path:
    """Write ``<step_dir>/MANIFEST`` (atomically: temp file, fsync, rename) and return its path."""
    out = step_dir / MANIFEST
    tmp = step_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    body = json.dumps({"format": 1, "files": step_checksums(step_dir)}, indent=1, sort_keys=True)
    with open(tmp, "w") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def verify_manifest(step_dir: Path) -> None:
    """Raise ValueError (one line naming the file) unless every file of the step folder matches
    its ``MANIFEST`` entry, with no file missing or extra."""
    path = step_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: expected a checksum manifest (the step was never sealed), found none")
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError(type(files).__name__)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: expected a JSON object with a 'files' map, got unreadable content ({e})") from None
    on_disk = step_files(step_dir)
    if sorted(files) != on_disk:
        missing, extra = sorted(set(files) - set(on_disk)), sorted(set(on_disk) - set(files))
        raise ValueError(f"{path}: expected exactly the listed files, missing {missing[:3]}, extra {extra[:3]}")
    for rel in on_disk:
        want, f = files[rel], step_dir / rel
        if not isinstance(want, dict) or f.stat().st_size != want.get("size") or file_sha256(f) != want.get("sha256"):
            raise ValueError(f"{f}: checksum mismatch against {MANIFEST} (the file changed after it was saved)")


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
        self._sealer: threading.Thread | None = None
        self._seal_error: tuple[int, Exception] | None = None
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
        step = int(step)
        meta = to_python(dict(meta or {}))
        self._join_sealer()
        self._set_aside_bad_step(step)
        started = bool(
            self._mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        )
        if started:
            if self._options.enable_async_checkpointing:
                self._sealer = threading.Thread(target=self._seal, args=(step,), name=f"ckpt-seal-{step}")
                self._sealer.start()
            else:
                self._seal(step)
                self._raise_seal_error()
        return started

    def _seal(self, step: int) -> None:
        """Wait for orbax to finish ``step``, then write its checksum manifest (main process)."""
        try:
            self._mgr.wait_until_finished()
            step_dir = self.directory / str(step)
            if is_main_process() and step_dir.is_dir():  # gone: already removed by max_to_keep
                write_manifest(step_dir)
        except Exception as e:  # reported by the next save / wait_until_finished
            self._seal_error = (step, e)

    def _join_sealer(self) -> None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        self._raise_seal_error()

    def _raise_seal_error(self) -> None:
        if self._seal_error is not None:
            step, e = self._seal_error
            self._seal_error = None
            raise RuntimeError(f"checkpoint step {step} in {self.directory}: saving failed "
                               f"({type(e).__name__}: {str(e)[:200]})") from e

    def _set_aside_bad_step(self, step: int) -> None:
        """The writer saves ``step`` again: an existing folder of that step that fails its
        checksums (a restore skipped it) is moved to ``_corrupt/``; a good one is left for
        orbax to refuse."""
        src = self.directory / str(step)
        if not src.is_dir():
            return
        try:
            verify_manifest(src)
            return
        except ValueError:
            pass
        if is_main_process():
            dst_root = self.directory / CORRUPT_DIR
            dst_root.mkdir(exist_ok=True)
            shutil.move(str(src), str(dst_root / f"{step}-{time.time_ns()}"))
        _sync_processes(f"swiftjax-ckpt-set-aside-{step}")
        self._mgr.reload()

    def wait_until_finished(self) -> None:
        """Block until the last save is written and sealed with its checksum manifest."""
        self._join_sealer()
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
        With ``step`` only that step is tried and its errors propagate (a checksum mismatch or
        a missing manifest is a ValueError). Without it, steps that fail their checksums or
        cannot be read are skipped with a warning (left in place: reading moves nothing) and
        ``None`` is returned when no step is good.
        """
        abstract = abstract_like(target)
        self._join_sealer()  # a save of this process still being sealed
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
            except Exception as e:  # corrupt, unsealed or partial: fall back to the previous step
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} is unreadable and was skipped "
                    f"({type(e).__name__}: {str(e)[:300]})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return None

    def _restore_step(self, step: int, abstract: Any) -> Restored:
        verify_manifest(self.directory / str(step))
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

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
