#!/usr/bin/env python3
"""Drive a Cloud TPU VM pod slice for swiftjax: create, install, run, copy-back, teardown.

Every subcommand is a short list of ``gcloud compute tpus tpu-vm`` calls (plus a local
``git archive``/``mkdir``); ``--dry-run`` prints them, one per line, exactly as they would run.

    python tpu_scripts/pod.py create   --name sj --zone us-central2-b --accelerator-type v4-32
    python tpu_scripts/pod.py install  --name sj --zone us-central2-b
    python tpu_scripts/pod.py run      --name sj --zone us-central2-b swift train configs/x.yaml swift.lr=1e-3
    python tpu_scripts/pod.py bon      --name sj --zone us-central2-b configs/gsm8k/swift.yaml model=/mnt/m --shared-dir /mnt/runs
    python tpu_scripts/pod.py copy-back --name sj --zone us-central2-b --remote-path runs --local ./runs
    python tpu_scripts/pod.py teardown --name sj --zone us-central2-b

``run`` executes ``python3 -m swiftjax.cli COMMAND CONFIG [key=value ...]`` on every worker at
once with ``SWIFTJAX_DISTRIBUTED=auto`` set, so ``swiftjax.train.distributed.maybe_initialize()``
lets JAX discover the slice's hosts; results are written by process 0 only and ``copy-back``
fetches them from worker 0.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = "/tmp/swiftjax-src.tar.gz"
DEFAULT_VERSION = "tpu-ubuntu2204-base"
DEFAULT_REMOTE_DIR = "~/swiftjax"


def _scope(a) -> list[str]:
    out = [f"--zone={a.zone}"]
    if a.project:
        out.append(f"--project={a.project}")
    return out


def _tpu(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *args]


def _ssh(a, worker: str, command: str) -> list[str]:
    return _tpu("ssh", a.name, f"--worker={worker}", *_scope(a), f"--command={command}")


def cmd_create(a) -> list[list[str]]:
    c = _tpu("create", a.name, *_scope(a), f"--accelerator-type={a.accelerator_type}",
             f"--version={a.version}")
    if a.spot:
        c.append("--spot")
    return [c]


def cmd_install(a) -> list[list[str]]:
    remote = a.remote_dir
    setup = " && ".join([
        f"mkdir -p {remote}",
        f"tar -xzf {ARCHIVE} -C {remote}",
        f"python3 -m pip install -q -U {shlex.quote('jax[tpu]')}",
        f"python3 -m pip install -q -e {remote}",
    ])
    return [
        ["git", "-C", str(a.repo), "archive", "--format=tar.gz", "-o", ARCHIVE, a.ref],
        _tpu("scp", ARCHIVE, f"{a.name}:{ARCHIVE}", "--worker=all", *_scope(a)),
        _ssh(a, "all", setup),
    ]


def cmd_run(a) -> list[list[str]]:
    env = _env_words(a, True)
    cli = ["python3", "-m", "swiftjax.cli", a.command, a.config, *a.overrides]
    line = f"cd {a.remote_dir} && " + " ".join(shlex.quote(e) for e in env) + " " + shlex.join(cli)
    return [_ssh(a, "all", line)]


def _env_words(a, distributed: bool) -> list[str]:
    env = (["SWIFTJAX_DISTRIBUTED=auto"] if distributed else []) + list(a.env)
    for e in env:
        if "=" not in e or not e.split("=", 1)[0].isidentifier():
            raise SystemExit(f"--env: expected NAME=VALUE, got {e!r}")
    return env


def cmd_bon(a) -> list[list[str]]:
    """Best-of-N with SWIFT on a slice: every worker samples its share of the candidate batches
    into ``--shared-dir`` (a folder all workers mount: NFS, gcsfuse), process 0 assembles each set;
    then worker 0 alone trains the head, scores and writes the results, reusing those sets."""
    shared = f"cache={a.shared_dir}"
    sample = ["python3", "-m", "swiftjax.cli", "sample", a.config, *a.overrides, shared, "split=both"]
    run = ["python3", "-m", "swiftjax.cli", "swift", "run", a.config, *a.overrides, shared]
    lines = []
    for words, worker, distributed in ((sample, "all", True), (run, "0", False)):
        env = _env_words(a, distributed)
        lines.append(_ssh(a, worker, f"cd {a.remote_dir} && " + " ".join(shlex.quote(e) for e in env)
                          + (" " if env else "") + shlex.join(words)))
    return lines


def cmd_copy_back(a) -> list[list[str]]:
    remote = a.remote_path if a.remote_path.startswith(("/", "~")) else f"{a.remote_dir}/{a.remote_path}"
    return [
        ["mkdir", "-p", a.local],
        _tpu("scp", "--recurse", f"{a.name}:{remote}", a.local, "--worker=0", *_scope(a)),
    ]


def cmd_teardown(a) -> list[list[str]]:
    return [_tpu("delete", a.name, *_scope(a), "--quiet")]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (pod slice) name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b")
    common.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    common.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, help="repo folder on workers")

    ap = argparse.ArgumentParser(prog="pod.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="sub", required=True)

    p = sub.add_parser("create", parents=[common], help="create the TPU VM slice")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-16")
    p.add_argument("--version", default=DEFAULT_VERSION, help="TPU VM runtime version")
    p.add_argument("--spot", action="store_true", help="request spot capacity")
    p.set_defaults(fn=cmd_create)

    p = sub.add_parser("install", parents=[common], help="copy the repo to all workers, pip install")
    p.add_argument("--repo", default=str(REPO), help="local git checkout to ship")
    p.add_argument("--ref", default="HEAD", help="git ref to archive (committed files only)")
    p.set_defaults(fn=cmd_install)

    p = sub.add_parser("run", parents=[common], help="run a swiftjax command on all workers")
    p.add_argument("command", help="swiftjax CLI command, e.g. 'swift train'")
    p.add_argument("config", help="config YAML path relative to the repo")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--env", action="append", default=[], help="extra NAME=VALUE on the workers")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bon", parents=[common],
                       help="sample on all workers into a shared folder, then SWIFT Best-of-N on worker 0")
    p.add_argument("config", help="a `swift run` config YAML path relative to the repo")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (both steps)")
    p.add_argument("--shared-dir", required=True, help="candidate folder every worker mounts")
    p.add_argument("--env", action="append", default=[], help="extra NAME=VALUE on the workers")
    p.set_defaults(fn=cmd_bon)

    p = sub.add_parser("copy-back", parents=[common], help="fetch results from worker 0")
    p.add_argument("--remote-path", default="runs", help="path on worker 0 (relative: under --remote-dir)")
    p.add_argument("--local", default="./runs", help="local destination folder")
    p.set_defaults(fn=cmd_copy_back)

    p = sub.add_parser("teardown", parents=[common], help="delete the TPU VM slice")
    p.set_defaults(fn=cmd_teardown)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    commands = a.fn(a)
    for c in commands:
        print(shlex.join(c), flush=True)
        if not a.dry_run:
            subprocess.run(c, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
