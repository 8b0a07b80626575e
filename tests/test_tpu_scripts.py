"""tpu_scripts/pod.py --dry-run prints the exact gcloud command lines (nothing is run)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
POD = REPO / "tpu_scripts" / "pod.py"
SCOPE = ["--zone=europe-west4-a", "--project=proj-1"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _dry(*args: str) -> list[list[str]]:
    proc = subprocess.run(
        [sys.executable, str(POD), *args, "--name", "pod-a", "--zone", "europe-west4-a",
         "--project", "proj-1", "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _command_of(argv: list[str]) -> str:
    [c] = [a for a in argv if a.startswith("--command=")]
    return c[len("--command="):]


def test_pod_create_dry_run():
    assert _dry("create", "--accelerator-type", "v4-32", "--version", "v2-alpha-tpuv5") == [
        TPU + ["create", "pod-a", *SCOPE, "--accelerator-type=v4-32", "--version=v2-alpha-tpuv5"]
    ]
    [line] = _dry("create", "--accelerator-type", "v5litepod-16", "--spot")
    assert line[-1] == "--spot" and "--version=tpu-ubuntu2204-base" in line


def test_pod_install_dry_run():
    lines = _dry("install", "--repo", "/src/sj", "--ref", "v1")
    assert lines[0] == ["git", "-C", "/src/sj", "archive", "--format=tar.gz", "-o",
                        "/tmp/swiftjax-src.tar.gz", "v1"]
    assert lines[1] == TPU + ["scp", "/tmp/swiftjax-src.tar.gz", "pod-a:/tmp/swiftjax-src.tar.gz",
                              "--worker=all", *SCOPE]
    assert lines[2][:5] == TPU + ["ssh"] and lines[2][5] == "pod-a"
    assert "--worker=all" in lines[2] and all(s in lines[2] for s in SCOPE)
    steps = [s.strip() for s in _command_of(lines[2]).split("&&")]
    assert steps[0] == "mkdir -p ~/swiftjax"
    assert steps[1] == "tar -xzf /tmp/swiftjax-src.tar.gz -C ~/swiftjax"
    assert shlex.split(steps[2]) == ["python3", "-m", "pip", "install", "-q", "-U", "jax[tpu]"]
    assert shlex.split(steps[3]) == ["python3", "-m", "pip", "install", "-q", "-e", "~/swiftjax"]


def test_pod_run_dry_run_sets_distributed_env_on_all_workers():
    [line] = _dry("run", "swift", "train", "configs/gsm8k/swift.yaml", "swift.lr=1e-3", "out=a b",
                  "--env=XLA_FLAGS=--xla_dump_to=/tmp/d")
    assert line[:6] == TPU + ["ssh", "pod-a"] and "--worker=all" in line
    cd, rest = _command_of(line).split("&&", 1)
    assert cd.strip() == "cd ~/swiftjax"
    assert shlex.split(rest) == [
        "SWIFTJAX_DISTRIBUTED=auto", "XLA_FLAGS=--xla_dump_to=/tmp/d",
        "python3", "-m", "swiftjax.cli", "swift", "train", "configs/gsm8k/swift.yaml", "swift.lr=1e-3", "out=a b",
    ]


def test_pod_copy_back_and_teardown_dry_run():
    lines = _dry("copy-back", "--remote-path", "runs/exp1", "--local", "out")
    assert lines == [
        ["mkdir", "-p", "out"],
        TPU + ["scp", "--recurse", "pod-a:~/swiftjax/runs/exp1", "out", "--worker=0", *SCOPE],
    ]
    assert _dry("teardown") == [TPU + ["delete", "pod-a", *SCOPE, "--quiet"]]


def test_pod_bad_arguments_fail():
    proc = subprocess.run([sys.executable, str(POD), "create", "--name", "x", "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--zone" in proc.stderr
    proc = subprocess.run([sys.executable, str(POD), "run", "c", "cfg.yaml", "--env", "NOEQUALS",
                           "--name", "x", "--zone", "z", "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "NAME=VALUE" in proc.stderr


def test_pod_bon_samples_on_every_worker_then_runs_swift_on_worker_0():
    lines = _dry("bon", "configs/gsm8k/swift.yaml", "model=/mnt/llama", "mesh.model=4",
                 "--shared-dir", "/mnt/shared/runs", "--env", "XLA_FLAGS=-x")
    assert len(lines) == 2
    sample, run = lines
    assert sample[:6] == TPU + ["ssh", "pod-a"] and "--worker=all" in sample
    cd, rest = _command_of(sample).split("&&", 1)
    assert cd.strip() == "cd ~/swiftjax"
    assert shlex.split(rest) == ["SWIFTJAX_DISTRIBUTED=auto", "XLA_FLAGS=-x", "python3", "-m", "swiftjax.cli",
                                 "sample", "configs/gsm8k/swift.yaml", "model=/mnt/llama", "mesh.model=4",
                                 "cache=/mnt/shared/runs", "split=both"]
    assert "--worker=0" in run
    _, rest = _command_of(run).split("&&", 1)
    assert shlex.split(rest) == ["XLA_FLAGS=-x", "python3", "-m", "swiftjax.cli", "swift", "run",
                                 "configs/gsm8k/swift.yaml", "model=/mnt/llama", "mesh.model=4",
                                 "cache=/mnt/shared/runs"]
