"""Where a decode step's time goes: a per-op profile of the greedy (or the study's sampled)
loop of a real converted model, summed over the profiled steps and divided by their count.

    python bench/profile_step.py --model ~/.cache/swiftjax/models/smollm2-135m-instruct --batch 64

Runs ``generate`` once to compile, then once more under ``jax.profiler`` with XLA:CPU's per-op
trace events on (``--xla_cpu_enable_xprof_traceme``; set before JAX starts), and prints the ops
by total time per step: the name XLA gave each fused op, its count per step and milliseconds.
A profile slows small ops down; it says where the time goes, `bench_decode.py` how much there is.
Run it on an idle machine.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from swiftjax.models.load import load_model  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402


SKIP = ("ThreadpoolListener", "end: ", "ThunkExecutor", "PjitFunction", "$")
NESTING = ("while", "conditional", "call")  # these contain other ops: counted apart, not in the sum


def op_times(trace_dir: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """({op name: [durations in ms]}, the same for the ops that contain others) of the XLA ops
    XLA:CPU's runtime threads recorded."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if len(files) != 1:
        raise SystemExit(f"profile: expected one .xplane.pb under {trace_dir}, found {len(files)}")
    data = jax.profiler.ProfileData.from_file(files[0])
    ops: dict[str, list[float]] = collections.defaultdict(list)
    outer: dict[str, list[float]] = collections.defaultdict(list)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name.startswith(SKIP):
                    continue
                (outer if kind(ev.name) in NESTING else ops)[ev.name].append(ev.duration_ns / 1e6)
    return ops, outer


def kind(name: str) -> str:
    """An op's family: its name without the numeric suffix XLA adds (fusion.12 -> fusion)."""
    return re.sub(r"[._]\d+$", "", name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="an HF model directory")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24, help="new tokens in the profiled run")
    ap.add_argument("--sampled", action="store_true", help="the study's draw (T 0.7, top-p 0.95, top-20 recorded)")
    ap.add_argument("--top", type=int, default=25, help="ops to print")
    args = ap.parse_args()
    model, mcfg = load_model(Path(args.model).expanduser())
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(3, mcfg.vocab_size, size=(args.batch, args.prompt_len)), jnp.int32)
    fields = dict(temperature=0.7, top_p=0.95, record_topk=20) if args.sampled else dict(temperature=0.0)
    cfg = SamplingConfig(max_new_tokens=args.steps, **fields)
    run = lambda: jax.block_until_ready(generate(model, ids, key=jax.random.key(0), cfg=cfg).tokens)  # noqa: E731
    run()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run()
        ops, outer = op_times(d)
    # ops in the decode loop run at least once per new token; the others (prefill, set-up) once
    loop = {n: v for n, v in ops.items() if len(v) >= args.steps - 1}
    once = sum(sum(v) for n, v in ops.items() if n not in loop)
    total = sum(sum(v) for v in loop.values())
    fam = collections.Counter()
    for n, v in loop.items():
        fam[kind(n)] += sum(v)
    print(f"{Path(args.model).name}, batch {args.batch}, prompt {args.prompt_len}, {args.steps} new tokens "
          f"({'sampled' if args.sampled else 'greedy'}): {1e3 * wall:.0f} ms unprofiled in all; profiled: loop ops "
          f"{total / args.steps:.1f} ms per step, ops outside the loop (prefill, set-up) {once:.0f} ms once")
    print(f"{'op in the loop':<44} {'per step':>9} {'ms/step':>9} {'share':>7}")
    for n, v in sorted(loop.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"{n[:44]:<44} {len(v) / args.steps:9.1f} {sum(v) / args.steps:9.2f} {sum(v) / total:7.1%}")
    for n, v in outer.items():
        print(f"(contains the others) {n}: {len(v)} x, {sum(v) / args.steps:.2f} ms/step")
    print("\nloop ops by family:")
    for n, v in fam.most_common(12):
        print(f"  {n:<36} {v / args.steps:9.2f} ms/step {v / total:7.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
