"""Feature store: SWIFT token features of a training set on disk, bf16, checksummed.

Layout of a store directory::

    manifest.json        written last: format, version, feature_dim, dtype, counts, the
                         feature spec, user metadata, and for every file its shape, dtype,
                         byte size and sha256
    shard_00000.npy ...  uint16 [tokens_s, F]: the bf16 bit patterns of the response tokens of
                         a run of whole rows (read memory-mapped)
    offsets.npy          int64 [N + 1]: row i's tokens are global tokens offsets[i]:offsets[i+1]
    labels.npy           float32 [N]: correctness in [0, 1]
    group_ids.npy        int64 [N]: the prompt each row answers
    extra_<name>.npy     optional per-row numeric arrays [N]

Only response tokens are stored (ragged rows, flattened), so nothing is spent on prompts or
padding. Features are rounded to bfloat16 (round to nearest even), half of float32's bytes; the
reader returns float32.

Atomicity: :class:`FeatureStoreWriter` writes into ``<dir>.tmp-*`` beside the target and renames
it into place after the manifest is written, so a store either exists whole or not at all; an
exception inside the writer's ``with`` block removes the temporary directory. Replacing a store
renames the old one aside to ``<dir>.old-*``, renames the new one in, then removes the old one;
a reader that finds the target missing reads a complete ``<dir>.old-*`` beside it, so the old
store stays readable until the new one is in place. A writer killed outright (SIGKILL, power
loss) cannot clean up; its temporary directory records the host and pid that own it
(``.owner``), and the next writer of the same store removes the leftovers (see
:func:`remove_stale`): temporary directories whose owner is gone or that have no owner, and
``.old-*`` directories once a store is in place.

Resumable writing (``resume=True``, for stores that take hours): the writer works in
``<dir>.partial`` and :meth:`FeatureStoreWriter.checkpoint` records the shards written so far
in ``progress.json`` (fsynced shards first, then the progress file atomically). A writer killed
in any way, or leaving its block with an exception, keeps that directory; the next resumable
writer of the same path with the same feature dim, spec and metadata continues after the last
checkpoint (:attr:`FeatureStoreWriter.rows_done`), anything else starts it afresh. Shards the
progress file does not list are removed, so a half-written shard is never read. The reader refuses
(ValueError naming the problem) a directory without a manifest (half-written), a missing or
truncated file, and, when ``verify`` (the default), any file whose sha256 differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from swiftjax._io import check_free_space, file_sha256

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "to_bf16_bits",
    "from_bf16_bits",
    "FeatureStoreWriter",
    "FeatureStore",
    "narrow_store",
    "remove_stale",
    "remove_stale_tmp",
]

FORMAT = "swiftjax-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".partial"
PROGRESS = "progress.json"


_OWNER = ".owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# a writer creates its temporary directory and then writes its owner: an owner-less directory
# younger than this may be a live writer between the two steps
OWNERLESS_GRACE_S = 60.0


def _owner(d: Path) -> tuple[str, int] | None:
    try:
        host, pid = (d / _OWNER).read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _is_stale_tmp(d: Path, grace_s: float) -> bool:
    owner = _owner(d)
    if owner is None:
        try:
            return time.time() - d.stat().st_mtime > grace_s
        except OSError:
            return False
    host, pid = owner
    return host == socket.gethostname() and pid != os.getpid() and not _alive(pid)


def remove_stale_tmp(path, *, grace_s: float = OWNERLESS_GRACE_S) -> list[Path]:
    """Remove the ``<path>.tmp-*`` directories left by writers of ``path`` that were killed
    outright: those whose ``.owner`` names this host and a process that no longer exists, and
    those without a readable owner last modified more than ``grace_s`` seconds ago. Directories
    of live writers and of other hosts (a shared filesystem) are left alone. Returns the removed
    paths."""
    path = Path(path)
    removed = []
    for d in sorted(path.parent.glob(f"{path.name}.tmp-*")):
        if d.is_dir() and _is_stale_tmp(d, grace_s):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _old_dirs(path: Path) -> list[Path]:
    """``<path>.old-*`` directories (previous stores being replaced), newest first."""
    def mtime(d: Path) -> float:
        try:
            return d.stat().st_mtime
        except OSError:
            return 0.0
    return sorted((d for d in path.parent.glob(f"{path.name}.old-*") if d.is_dir()), key=mtime, reverse=True)


def remove_stale(path, *, grace_s: float = OWNERLESS_GRACE_S) -> list[Path]:
    """What a writer of ``path`` cleans before writing: stale ``<path>.tmp-*`` directories
    (:func:`remove_stale_tmp`) and, when a store is in place at ``path``, every
    ``<path>.old-*`` (left by a replacement killed before it removed the old store). With
    ``path`` missing an ``.old-*`` is the last complete store, which readers fall back to: it
    is kept until a new store is in place. Returns the removed paths."""
    path = Path(path)
    removed = remove_stale_tmp(path, grace_s=grace_s)
    if path.is_dir():
        for d in _old_dirs(path):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def to_bf16_bits(x) -> np.ndarray:
    """float array -> uint16 bit patterns of its bfloat16 rounding (nearest even)."""
    a = np.asarray(x)
    if a.dtype == ml_dtypes.bfloat16:
        return a.view(np.uint16)
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bf16_bits(bits) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return np.asarray(bits).view(ml_dtypes.bfloat16).astype(np.float32)


class _HashingFile:
    """Write-only file wrapper that hashes what passes through (np.save writes via .write)."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data):
        b = memoryview(data).cast("B")
        self.sha.update(b)
        self.nbytes += len(b)
        return self.fh.write(b)

    def flush(self):
        self.fh.flush()


def _save(path: Path, arr: np.ndarray) -> dict:
    """np.save ``arr`` to ``path`` (fsynced); return its manifest entry."""
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as fh:
        hf = _HashingFile(fh)
        np.lib.format.write_array(hf, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    return {"file": path.name, "shape": list(arr.shape), "dtype": arr.dtype.str,
            "bytes": hf.nbytes, "sha256": hf.sha.hexdigest()}


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _json_ready(obj, name: str):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a JSON-serialisable value, got {type(obj).__name__} ({e})") from None


# ----------------------------------------------------------------------------- writer


class FeatureStoreWriter:
    """Write a feature store at ``path`` (which must not exist unless ``overwrite``).

    feature_dim: F. spec: a JSON-ready description of the features (e.g.
    ``FeatureSpec.to_dict()``); meta: any JSON-ready metadata. A shard is written once
    ``shard_rows`` rows or ``shard_bytes`` bytes are buffered (a longer row gets a shard alone),
    so memory stays at one shard. Use as a context manager::

        with FeatureStoreWriter(path, F, spec.to_dict()) as w:
            w.add(rows, labels, group_ids)      # rows: list of [T_i, F]
        store = FeatureStore(path)

    Leaving the block normally calls :meth:`close` (finalise and rename into place); an
    exception calls :meth:`abort` (remove the temporary directory) and propagates.
    """

    def __init__(self, path, feature_dim: int, spec: Mapping | None = None, *,
                 shard_rows: int = 4096, shard_bytes: int = 256 << 20, meta: Mapping | None = None,
                 overwrite: bool = False, resume: bool = False):
        if not _is_int(feature_dim) or feature_dim < 1:
            raise ValueError(f"feature_dim: expected a positive int, got {feature_dim!r}")
        for name, v in (("shard_rows", shard_rows), ("shard_bytes", shard_bytes)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ValueError(f"path: {self.path} already exists (pass overwrite=True to replace it)")
        self.feature_dim = int(feature_dim)
        self.spec = _json_ready(dict(spec) if spec is not None else {}, "spec")
        self.meta = _json_ready(dict(meta) if meta is not None else {}, "meta")
        self.shard_rows, self.shard_bytes = int(shard_rows), int(shard_bytes)
        self.overwrite = bool(overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path)
        self.resume = bool(resume)
        self._buf: list[np.ndarray] = []
        self._buf_tokens = 0
        self._shards: list[dict] = []
        self._lengths: list[int] = []
        self._labels: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []
        self._extras: dict[str, list[np.ndarray]] | None = None
        self._rows_written = 0
        self._tokens_written = 0
        self._checkpoints: list[int] = [0]
        if self.resume:
            self.tmp = self.path.parent / f"{self.path.name}{PARTIAL}"
            self._open_partial()
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.path.name}.tmp-", dir=self.path.parent))
        (self.tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        self._state = "open"

    # -------------------------------------------------------------- resuming
    def _identity(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "feature_dim": self.feature_dim, "spec": self.spec,
                "meta": self.meta}

    def _open_partial(self) -> None:
        """Take over ``<path>.partial``: continue its checkpointed rows when they were written
        for the same store (identity), else empty it."""
        d = self.tmp
        if not d.is_dir():
            d.mkdir()
            return
        owner = _owner(d)
        if owner is not None and owner != (socket.gethostname(), os.getpid()):
            host, pid = owner
            if host != socket.gethostname() or _alive(pid):
                raise ValueError(f"path: {d} is being written by process {pid} on {host} "
                                 "(wait for it to finish or stop it)")
        progress = None
        try:
            with open(d / PROGRESS) as fh:
                progress = json.load(fh)
        except (OSError, ValueError):
            pass
        keep: set[str] = set()
        if isinstance(progress, dict) and progress.get("writer") == self._identity():
            try:
                keep = self._restore(progress)
            except (KeyError, TypeError, ValueError):
                self._reset_rows()
                keep = set()
        for f in d.iterdir():
            if f.name not in keep and f.name != _OWNER:
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)

    def _reset_rows(self) -> None:
        self._shards, self._lengths, self._labels, self._groups = [], [], [], []
        self._extras, self._rows_written, self._tokens_written, self._checkpoints = None, 0, 0, [0]

    def _restore(self, progress: dict) -> set[str]:
        """Restore the checkpointed state; a listed shard that is missing or of another size
        makes the whole progress invalid (ValueError)."""
        shards = list(progress["shards"])
        for e in shards:
            f = self.tmp / str(e["file"])
            if Path(e["file"]).name != e["file"] or not f.is_file() or f.stat().st_size != e["bytes"]:
                raise ValueError(f"{f}: missing or truncated")
        lengths = [int(x) for x in progress["lengths"]]
        rows = shards[-1]["row_end"] if shards else 0
        if len(lengths) != rows or len(progress["labels"]) != rows or len(progress["group_ids"]) != rows:
            raise ValueError("inconsistent progress")
        self._shards, self._lengths = shards, lengths
        self._labels = [np.asarray(progress["labels"], np.float32)] if rows else []
        self._groups = [np.asarray(progress["group_ids"], np.int64)] if rows else []
        ex = progress.get("extras")
        self._extras = None if ex is None else {k: [np.asarray(v["values"], np.dtype(v["dtype"]))] if rows else []
                                               for k, v in ex.items()}
        self._rows_written, self._tokens_written = rows, int(sum(lengths))
        self._checkpoints = [int(c) for c in progress["checkpoints"]]
        if self._checkpoints[-1] != rows:
            raise ValueError("inconsistent progress")
        return {e["file"] for e in shards}

    @property
    def rows_done(self) -> int:
        """Rows already in the store (checkpointed by an earlier writer, or added and flushed
        since); the caller adds the rows from this one on."""
        return self._rows_written + len(self._buf)

    def written(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels [rows_done] float32, group ids [rows_done] int64) of the rows added so far,
        checkpointed ones included: a resuming caller checks they are the rows it would add."""
        lab = np.concatenate(self._labels) if self._labels else np.zeros((0,), np.float32)
        grp = np.concatenate(self._groups) if self._groups else np.zeros((0,), np.int64)
        return lab, grp

    def checkpoint(self) -> None:
        """Flush the buffered rows as a shard and record every row so far in ``progress.json``
        (resumable writers only): a later writer resumes after them."""
        if not self.resume:
            raise ValueError("FeatureStoreWriter.checkpoint: expected a writer opened with resume=True")
        if self._state != "open":
            raise ValueError(f"FeatureStoreWriter.checkpoint: the writer is {self._state}")
        self._flush()
        if self._checkpoints[-1] != self._rows_written:
            self._checkpoints.append(self._rows_written)
        extras = None if self._extras is None else {
            k: {"dtype": np.concatenate(v).dtype.str if v else "<f8",
                "values": np.concatenate(v).tolist() if v else []} for k, v in self._extras.items()}
        progress = {"writer": self._identity(), "shards": self._shards, "lengths": self._lengths,
                    "labels": np.concatenate(self._labels).tolist() if self._labels else [],
                    "group_ids": np.concatenate(self._groups).tolist() if self._groups else [],
                    "extras": extras, "checkpoints": self._checkpoints}
        part = self.tmp / (PROGRESS + ".part")
        with open(part, "w") as fh:
            json.dump(progress, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, self.tmp / PROGRESS)

    def rollback(self, rows: int) -> int:
        """Forget the rows after the last checkpoint at or before ``rows`` (so several stores
        written together continue from the same row); returns that checkpoint."""
        if self._buf:
            raise ValueError("FeatureStoreWriter.rollback: expected no buffered rows (call it right after opening)")
        c = max(x for x in self._checkpoints if x <= rows)
        if c == self._rows_written:
            return c
        for e in self._shards:
            if e["row_end"] > c:
                (self.tmp / e["file"]).unlink(missing_ok=True)
        self._shards = [e for e in self._shards if e["row_end"] <= c]
        self._lengths = self._lengths[:c]
        self._labels = [np.concatenate(self._labels)[:c]] if c else []
        self._groups = [np.concatenate(self._groups)[:c]] if c else []
        if self._extras is not None:
            self._extras = {k: [np.concatenate(v)[:c]] if c else [] for k, v in self._extras.items()}
        self._rows_written, self._tokens_written = c, int(sum(self._lengths))
        self._checkpoints = [x for x in self._checkpoints if x <= c]
        self.checkpoint()
        return c

    # -------------------------------------------------------------- input
    def _rows_from(self, features, mask) -> list[np.ndarray]:
        if isinstance(features, (list, tuple)):
            if mask is not None:
                raise ValueError("mask: expected None when features is a list of [T_i, F] rows")
            rows = [np.asarray(r) for r in features]
            for i, r in enumerate(rows):
                if r.ndim != 2:
                    raise ValueError(f"features[{i}]: expected shape [T_i, F] (2-D), got {r.shape}")
            return rows
        x = np.asarray(features)
        if x.ndim != 3:
            raise ValueError(f"features: expected a list of [T_i, F] rows or a [B, T, F] batch, got shape {x.shape}")
        if mask is None:
            raise ValueError("mask: expected a [B, T] response mask with a padded [B, T, F] batch, got None")
        m = np.asarray(mask)
        if m.shape != x.shape[:2]:
            raise ValueError(f"mask: expected shape {x.shape[:2]} (features' [B, T]), got {m.shape}")
        return [x[b][m[b] > 0] for b in range(x.shape[0])]

    def add(self, features, labels, group_ids, mask=None, *, extras: Mapping | None = None) -> None:
        """Append rows.

        features: a list of B arrays [T_i, F] (response tokens only), or a padded batch
          [B, T, F] with ``mask`` [B, T] (1 on response tokens; only those are kept).
        labels: [B] correctness in [0, 1]; group_ids: [B] ints; extras: {name: [B] numbers},
          the same names at every call.
        Rows need at least one token and finite features.
        """
        if self._state != "open":
            raise ValueError(f"FeatureStoreWriter.add: the writer is {self._state}")
        rows = self._rows_from(features, mask)
        b = len(rows)
        if b == 0:
            return
        lab = np.asarray(labels)
        grp = np.asarray(group_ids)
        if lab.shape != (b,):
            raise ValueError(f"labels: expected shape ({b},) (one per row), got {lab.shape}")
        if grp.shape != (b,):
            raise ValueError(f"group_ids: expected shape ({b},) (one per row), got {grp.shape}")
        if not np.issubdtype(grp.dtype, np.integer):
            raise ValueError(f"group_ids: expected integers, got dtype {grp.dtype}")
        if not np.issubdtype(lab.dtype, np.number) and lab.dtype != np.bool_:
            raise ValueError(f"labels: expected numbers in [0, 1], got dtype {lab.dtype}")
        lab = lab.astype(np.float32)
        if not np.all(np.isfinite(lab)) or np.any((lab < 0) | (lab > 1)):
            raise ValueError(f"labels: expected values in [0, 1], got range [{lab.min()}, {lab.max()}]")
        ex = {} if extras is None else dict(extras)
        if self._extras is None:
            self._extras = {k: [] for k in ex}
        if set(ex) != set(self._extras):
            raise ValueError(f"extras: expected keys {sorted(self._extras)} (as in the first add), got {sorted(ex)}")
        ex_arrays = {}
        for k, v in ex.items():
            if not (isinstance(k, str) and k.isidentifier()):
                raise ValueError(f"extras: expected identifier names, got {k!r}")
            a = np.asarray(v)
            if a.shape != (b,) or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                raise ValueError(f"extras[{k!r}]: expected a numeric array of shape ({b},), got {a.dtype} {a.shape}")
            ex_arrays[k] = a
        bits = []
        for i, r in enumerate(rows):
            if r.shape[1] != self.feature_dim:
                raise ValueError(f"features[{i}]: expected feature dim F={self.feature_dim}, got shape {r.shape}")
            if r.shape[0] == 0:
                raise ValueError(f"features[{i}]: expected at least one response token, got an empty row")
            if not (np.issubdtype(r.dtype, np.floating) or r.dtype == ml_dtypes.bfloat16):
                raise ValueError(f"features[{i}]: expected a floating-point array, got dtype {r.dtype}")
            if not np.all(np.isfinite(r.astype(np.float32))):
                raise ValueError(f"features[{i}]: expected finite values, found NaN or inf")
            b16 = to_bf16_bits(r)
            if np.any((b16 & 0x7F80) == 0x7F80):
                raise ValueError(f"features[{i}]: values overflow bfloat16 (|x| > 3.39e38)")
            bits.append(b16)
        for i, r in enumerate(bits):
            self._buf.append(r)
            self._buf_tokens += r.shape[0]
            self._lengths.append(r.shape[0])
            if (len(self._buf) >= self.shard_rows
                    or self._buf_tokens * self.feature_dim * 2 >= self.shard_bytes):
                self._flush()
        self._labels.append(lab)
        self._groups.append(grp.astype(np.int64))
        for k, a in ex_arrays.items():
            self._extras[k].append(a)

    def _flush(self) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf, axis=0)
        entry = _save(self.tmp / f"shard_{len(self._shards):05d}.npy", data)
        entry.update(row_start=self._rows_written, row_end=self._rows_written + len(self._buf),
                     token_start=self._tokens_written)
        self._shards.append(entry)
        self._rows_written += len(self._buf)
        self._tokens_written += data.shape[0]
        self._buf, self._buf_tokens = [], 0

    # -------------------------------------------------------------- finish
    def close(self) -> Path:
        """Flush, write the arrays and the manifest (last), rename into place; returns the path."""
        if self._state == "closed":
            return self.path
        if self._state != "open":
            raise ValueError(f"FeatureStoreWriter.close: the writer is {self._state}")
        try:
            if not self._lengths:
                raise ValueError("FeatureStoreWriter.close: expected at least one row, got none")
            self._flush()
            n = len(self._lengths)
            offsets = np.zeros((n + 1,), np.int64)
            np.cumsum(np.asarray(self._lengths, np.int64), out=offsets[1:])
            arrays = {
                "offsets": _save(self.tmp / "offsets.npy", offsets),
                "labels": _save(self.tmp / "labels.npy", np.concatenate(self._labels)),
                "group_ids": _save(self.tmp / "group_ids.npy", np.concatenate(self._groups)),
            }
            extras = {}
            for k, parts in (self._extras or {}).items():
                extras[k] = _save(self.tmp / f"extra_{k}.npy", np.concatenate(parts))
            manifest = {
                "format": FORMAT, "version": VERSION, "feature_dim": self.feature_dim,
                "dtype": "bfloat16", "storage_dtype": "uint16", "num_rows": n,
                "num_tokens": int(offsets[-1]), "max_len": int(max(self._lengths)),
                "spec": self.spec, "meta": self.meta, "shards": self._shards,
                "arrays": arrays, "extras": extras,
            }
            tmp_manifest = self.tmp / (MANIFEST + ".part")
            with open(tmp_manifest, "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_manifest, self.tmp / MANIFEST)
            (self.tmp / PROGRESS).unlink(missing_ok=True)
            self._install()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.path

    def _install(self) -> None:
        """Rename the old store aside (readers fall back to it), the new one in, then remove
        the old one. The temporary directory keeps its owner until it is the store, so a kill
        at any point leaves only leftovers the next writer recognises."""
        old = None
        if self.path.exists():
            if not self.overwrite:
                raise ValueError(f"path: {self.path} appeared while writing (pass overwrite=True to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f"{self.path.name}.old-", dir=self.path.parent))
            os.rmdir(old)
            os.rename(self.path, old)
        try:
            os.rename(self.tmp, self.path)
        except BaseException:
            if old is not None:  # put the previous store back
                os.rename(old, self.path)
            raise
        (self.path / _OWNER).unlink(missing_ok=True)  # the store itself carries no owner
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        remove_stale(self.path)  # .old-* of earlier replacements killed before their cleanup

    def abort(self) -> None:
        """Discard everything written so far (the temporary directory); a resumable writer
        keeps its checkpointed rows for the next one."""
        if self._state == "closed":
            return
        if self.resume:
            (self.tmp / _OWNER).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._buf = []
        self._state = "aborted"

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- reader


def _readable_dir(path: Path) -> Path:
    """``path``, or while it is missing (a replacement between its two renames, or killed
    there) the newest complete ``<path>.old-*`` beside it."""
    for _ in range(3):  # the installer may finish (and remove the old store) while we look
        if path.is_dir():
            return path
        for d in _old_dirs(path):
            if (d / MANIFEST).is_file():
                return d
    raise ValueError(f"feature store: expected a directory at {path}, found none")


def _checked_columns(columns, feature_dim: int) -> np.ndarray:
    """``columns`` as a non-empty 1-D int array of indices in [0, feature_dim), or ValueError."""
    cols = np.asarray(columns)
    if (cols.ndim != 1 or cols.size == 0 or not np.issubdtype(cols.dtype, np.integer)
            or cols.min() < 0 or cols.max() >= feature_dim):
        raise ValueError(f"columns: expected a non-empty 1-D int array of indices in [0, {feature_dim}), "
                         f"got {cols.dtype} {cols.shape}")
    return cols


class FeatureStore:
    """Read a feature store (memory-mapped shards).

    Opening checks the manifest, every file's presence, byte size and header, the offsets'
    consistency, and (``verify=True``) every file's sha256; any failure raises ValueError
    naming the store and the problem. While ``path`` is missing but a complete ``<path>.old-*``
    (the store being replaced) lies beside it, that one is read (``.path`` names it).

    Attributes: ``feature_dim`` (F), ``spec``, ``meta`` (dicts from the writer), ``labels`` [N]
    float32, ``group_ids`` [N] int64, ``lengths`` [N] int64 (response tokens per row),
    ``offsets`` [N + 1], ``extras`` {name: [N]}, ``num_tokens``, ``max_len``; ``len(store)`` = N.
    """

    def __init__(self, path, *, verify: bool = True):
        self.path = path = Path(path)
        try:
            self._open(_readable_dir(path), verify)
        except ValueError:
            if self.path == path or not path.is_dir():
                raise
            self._open(path, verify)  # the replacement finished (old store removed) while we read

    def _open(self, path: Path, verify: bool) -> None:
        self.path = path
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ValueError(
                f"feature store {self.path}: no {MANIFEST}: a half-written or incomplete store "
                "(the manifest is written last); rewrite it")
        try:
            with open(mpath) as fh:
                m = json.load(fh)
        except (OSError, ValueError) as e:
            raise ValueError(f"feature store {self.path}: unreadable {MANIFEST} ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"feature store {self.path}: {MANIFEST} is not a {FORMAT!r} manifest")
        if m.get("version") != VERSION:
            raise ValueError(f"feature store {self.path}: expected format version {VERSION}, got {m.get('version')!r}")
        try:
            self.feature_dim = int(m["feature_dim"])
            n, n_tok = int(m["num_rows"]), int(m["num_tokens"])
            shards, arrays, extras = m["shards"], m["arrays"], m.get("extras", {})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"feature store {self.path}: malformed {MANIFEST} (missing {e})") from None
        self.manifest = m
        self.spec = m.get("spec", {})
        self.meta = m.get("meta", {})
        self.num_tokens = n_tok
        self.max_len = int(m.get("max_len", 0))
        self.verify = bool(verify)

        self.offsets = self._load(arrays.get("offsets"), "offsets", (n + 1,), np.int64)
        self.labels = np.asarray(self._load(arrays.get("labels"), "labels", (n,), np.float32))
        self.group_ids = np.asarray(self._load(arrays.get("group_ids"), "group_ids", (n,), np.int64))
        self.extras = {k: np.asarray(self._load(e, f"extras[{k!r}]", (n,), None)) for k, e in extras.items()}
        self.offsets = np.asarray(self.offsets)
        if self.offsets[0] != 0 or self.offsets[-1] != n_tok or np.any(np.diff(self.offsets) < 1):
            raise ValueError(f"feature store {self.path}: inconsistent offsets (expected 0 .. {n_tok}, "
                             "increasing by at least one token per row)")
        self.lengths = np.diff(self.offsets)

        self._shards = []
        row_starts, token_starts = [], []
        expect_row = 0
        for j, s in enumerate(shards):
            try:
                r0, r1, t0 = int(s["row_start"]), int(s["row_end"]), int(s["token_start"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"feature store {self.path}: malformed shard entry {j} in {MANIFEST}") from None
            if r0 != expect_row or r1 <= r0 or t0 != self.offsets[r0]:
                raise ValueError(f"feature store {self.path}: shard {j} rows/tokens do not follow the offsets")
            tokens = int(self.offsets[r1] - self.offsets[r0])
            self._shards.append(self._load(s, f"shard {j}", (tokens, self.feature_dim), np.uint16))
            row_starts.append(r0)
            token_starts.append(t0)
            expect_row = r1
        if expect_row != n:
            raise ValueError(f"feature store {self.path}: shards cover {expect_row} rows, expected {n}")
        self._row_starts = np.asarray(row_starts, np.int64)
        self._token_starts = np.asarray(token_starts, np.int64)

    def _load(self, entry, what: str, shape, dtype):
        where = f"feature store {self.path}, {what}"
        if not isinstance(entry, dict) or "file" not in entry:
            raise ValueError(f"{where}: no entry in {MANIFEST}")
        f = self.path / str(entry["file"])
        if Path(entry["file"]).name != entry["file"]:
            raise ValueError(f"{where}: expected a plain file name, got {entry['file']!r}")
        if not f.is_file():
            raise ValueError(f"{where}: file {f.name} is missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise ValueError(f"{where}: file {f.name} has {size} bytes, the manifest says "
                             f"{entry.get('bytes')} (truncated or modified)")
        if self.verify and file_sha256(f) != entry.get("sha256"):
            raise ValueError(f"{where}: sha256 of {f.name} does not match the manifest (corrupt)")
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read {f.name} ({e})") from None
        if tuple(arr.shape) != tuple(shape) or (dtype is not None and arr.dtype != np.dtype(dtype)):
            raise ValueError(f"{where}: expected {np.dtype(dtype) if dtype else ''} {tuple(shape)}, "
                             f"got {arr.dtype} {arr.shape}")
        return arr

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _index(self, i) -> int:
        if not _is_int(i) or not -len(self) <= i < len(self):
            raise ValueError(f"index: expected an int in [0, {len(self)}), got {i!r}")
        return int(i) % len(self)

    def _locate(self, i: int) -> tuple[int, int, int]:
        """(shard, first token, end token) of row i (a valid index) inside its shard."""
        s = int(np.searchsorted(self._row_starts, i, side="right") - 1)
        return s, int(self.offsets[i] - self._token_starts[s]), int(self.offsets[i + 1] - self._token_starts[s])

    def row_bits(self, i: int) -> np.ndarray:
        """Row i's stored bf16 bit patterns [T_i, F] uint16 (a memory-mapped view)."""
        s, a, b = self._locate(self._index(i))
        return self._shards[s][a:b]

    def row(self, i: int) -> np.ndarray:
        """Row i's features [T_i, F] float32."""
        return from_bf16_bits(self.row_bits(i))

    def _read_row_bits(self, i: int, dst: np.ndarray, files: dict) -> None:
        """Row i's bf16 bits into ``dst`` ([T_i, F] uint16, C-contiguous) with positioned reads of
        the whole row. Faulting a memory-mapped row in page by page ran at ~230 MB/s on a store
        larger than the page cache (the SWIFT study's 30 GB all-layer store: its head training
        was bound by it); a plain read of the row's bytes runs at the disk's rate. ``files``
        caches the open shard files of one batch."""
        s, a, b = self._locate(i)
        shard = self._shards[s]
        if not isinstance(shard, np.memmap) or not dst.flags.c_contiguous:
            dst[...] = shard[a:b]
            return
        if s not in files:
            files[s] = open(shard.filename, "rb", buffering=0)
        fh, view, pos = files[s], memoryview(dst).cast("B"), int(shard.offset) + a * self.feature_dim * 2
        done = 0
        while done < len(view):
            fh.seek(pos + done)
            got = fh.readinto(view[done:])
            if not got:
                raise ValueError(f"feature store {self.path}: shard {Path(shard.filename).name} ended early "
                                 f"reading row {i} (truncated since it was opened)")
            done += got

    def batch(self, indices: Sequence[int], pad_to: int | None = None, *,
              columns=None, exact_bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` as (features [B, Tmax, F] float32, mask [B, Tmax] float32), right-padded
        with zeros; ``Tmax`` = the longest selected row, or ``pad_to`` (>= it) for fixed shapes
        (``pad_to=store.max_len`` gives one shape for every batch). ``columns`` (an int index
        array into [0, F)): only those features, in that order (F becomes ``len(columns)``;
        only they are converted). ``exact_bf16``: the features as the stored bfloat16 values
        (ml_dtypes.bfloat16, the same numbers as the float32 ones in half the bytes)."""
        cols = None if columns is None else _checked_columns(columns, self.feature_dim)
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices: expected a non-empty 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = np.asarray([self._index(int(i)) for i in idx], np.int64)
        longest = int(self.lengths[idx].max())
        t = longest if pad_to is None else pad_to
        if not _is_int(t) or t < longest:
            raise ValueError(f"pad_to: expected an int >= the longest selected row ({longest}), got {pad_to!r}")
        f = self.feature_dim if cols is None else cols.size
        out = np.zeros((idx.size, int(t), f), np.uint16 if exact_bf16 else np.float32)
        mask = np.zeros((idx.size, int(t)), np.float32)
        files: dict = {}
        try:
            for j, i in enumerate(idx):
                n = int(self.lengths[i])
                if cols is None and exact_bf16:
                    self._read_row_bits(int(i), out[j, :n], files)      # straight into the batch
                else:
                    r = np.empty((n, self.feature_dim), np.uint16)
                    self._read_row_bits(int(i), r, files)
                    r = r if cols is None else r[:, cols]
                    out[j, :n] = r if exact_bf16 else from_bf16_bits(r)
                mask[j, :n] = 1.0
        finally:
            for fh in files.values():
                fh.close()
        return (out.view(ml_dtypes.bfloat16) if exact_bf16 else out), mask

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, rows={len(self)}, tokens={self.num_tokens}, "
                f"F={self.feature_dim}, shards={len(self._shards)})")


def narrow_store(src: FeatureStore, path, columns, *, spec: Mapping | None = None, meta: Mapping | None = None,
                 rows_per_add: int = 64) -> FeatureStore:
    """A new store at ``path`` holding only ``columns`` (int indices into [0, F), in that order)
    of every row of ``src``: the same bfloat16 values bit for bit, labels, group ids, extras
    and lengths. A head that reads a few layers of a wide all-layer store (a 0.5B model's 25
    states x 896 = 22,400 features, 30 GB for 2,400 responses) reads them from disk at every
    epoch; their own store is a tenth of that and stays in the page cache. Written like every
    store (a temporary directory renamed into place, replacing ``path``); returns it opened."""
    cols = _checked_columns(columns, src.feature_dim)
    if not _is_int(rows_per_add) or rows_per_add < 1:
        raise ValueError(f"rows_per_add: expected a positive int, got {rows_per_add!r}")
    check_free_space(Path(path).parent, src.num_tokens * int(cols.size) * 2, f"narrowed store {Path(path).name}")
    n = len(src)
    with FeatureStoreWriter(path, int(cols.size), src.spec if spec is None else spec,
                            meta=src.meta if meta is None else meta, overwrite=True) as w:
        for a in range(0, n, rows_per_add):
            idx = np.arange(a, min(n, a + rows_per_add))
            x, m = src.batch(idx, columns=cols, exact_bf16=True)
            w.add(x, src.labels[idx], src.group_ids[idx], m,
                  extras={k: v[idx] for k, v in src.extras.items()} or None)
    return FeatureStore(path)

