"""A trained SWIFT head on disk: a directory holding ``weights-<sha>.npz`` and ``head.json``.

``head.json`` is the commit point: it names the weights file, its sha256, the kernel shape,
the feature spec and where the head came from (model digest, task, training info). Saving
writes the new weights file first, then replaces ``head.json`` atomically, then removes the
old weights file: at every instant the directory holds one complete, readable head (a kill
leaves at most an orphan weights file, which the next save removes). Loading only reads: it
checks the checksum, the shapes and that every weight is finite, and raises a clear error
otherwise; it never moves or deletes anything.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from swiftjax._io import atomic_file
from swiftjax.methods.swift.features import FeatureSpec

__all__ = ["save_head", "load_head"]

FORMAT = 2


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_head(path, params, spec: FeatureSpec, info: dict) -> Path:
    """Write a head (``params``: {'kernel' [F, C], 'bias' [C]}) under directory ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"head: expected a directory, {path} is a file")
    kernel = np.asarray(params["kernel"], np.float32)
    bias = np.asarray(params["bias"], np.float32)
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(f"head params: expected kernel [F, C] and bias [C], got {kernel.shape} and {bias.shape}")
    if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
        raise ValueError("head params: expected finite weights (training diverged?)")
    buf = io.BytesIO()
    np.savez(buf, kernel=kernel, bias=bias)
    data = buf.getvalue()
    sha = _sha256(data)
    name = f"weights-{sha[:16]}.npz"
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / name, "wb") as f:
        f.write(data)
    meta = {"format": FORMAT, "weights": name, "sha256": sha, "kernel_shape": list(kernel.shape),
            "spec": spec.to_dict(), "info": info}
    with atomic_file(path / "head.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2, default=float))
    for old in path.glob("weights-*.npz"):  # the committed head.json no longer names these
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def load_head(path):
    """(params {'kernel', 'bias'} float32 numpy, FeatureSpec, meta dict) of a saved head."""
    path = Path(path)
    meta_file = path / "head.json"
    if not meta_file.is_file():
        raise ValueError(f"head: expected a trained head directory with head.json at {path}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_file}: expected the head's JSON metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: expected a head of format {FORMAT} (written by this version of swiftjax); "
                         "retrain it with `swiftjax swift train`")
    for k in ("weights", "sha256", "kernel_shape", "spec"):
        if k not in meta:
            raise ValueError(f"{meta_file}: missing field {k!r}")
    weights = path / str(meta["weights"])
    if Path(meta["weights"]).name != meta["weights"] or not weights.is_file():
        raise ValueError(f"{meta_file}: field 'weights': expected a file beside head.json, {weights} is missing")
    data = weights.read_bytes()
    if _sha256(data) != meta["sha256"]:
        raise ValueError(f"{weights}: checksum mismatch (sha256 {_sha256(data)[:16]}..., head.json says "
                         f"{str(meta['sha256'])[:16]}...): the file is corrupt")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        kernel, bias = z["kernel"], z["bias"]
    shape = meta["kernel_shape"]
    if list(kernel.shape) != list(shape) or bias.shape != (kernel.shape[1],):
        raise ValueError(f"{meta_file}: field 'kernel_shape': says {shape}, the weights hold {list(kernel.shape)}")
    if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
        raise ValueError(f"{weights}: expected finite weights")
    spec = FeatureSpec.from_dict(meta["spec"])
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}, spec, meta
