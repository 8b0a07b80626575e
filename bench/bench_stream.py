"""Best-of-N sampling throughput: lock-step batches against continuous batching.

    python bench/bench_stream.py [--model DIR] [--problems 8] [--n 8] [--slots 16] [--new-tokens 256]
                                 [--noise full|head|both]

Real chat prompts (GSM8K questions through the model's chat template, asked for a \\boxed{}
answer, when ``../shared/data`` is present) and the real model
from the model cache (``swiftjax models fetch``; SmolLM2-135M-Instruct by default, the
shipped world model on its own problems when it is absent), sampled
as the study samples them (temperature 0.7, top-p 0.95). Both ways decode the same rows with
the same number of rows in flight:

* lock-step: ``slots``-row batches, each decoded until its longest row ends (prompt shared);
* continuous (:mod:`swiftjax.stream`): ``slots`` slots refilled every ``--refill`` tokens.

Printed: candidates/s, generated tokens/s, and the fraction of decoded row-steps that belong
to a live row (1.0 = no slot ever idles). Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402

from swiftjax.backbone import load_backbone  # noqa: E402
from swiftjax.batching import padded_batches, take  # noqa: E402
from swiftjax.convert.fetch import models_root  # noqa: E402
from swiftjax import sampling  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402
from swiftjax.stream import stream_generate  # noqa: E402
from swiftjax.tasks import make_task  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


def _questions(k: int, world: bool) -> tuple[str, list[str]]:
    if GSM8K.is_file() and not world:
        task = make_task({"name": "gsm8k", "test_path": str(GSM8K), "n_test": k, "prompt": PROMPT})
    else:
        task = make_task({"name": "world", "n_test": k})
    return task.name, [task.user_message(p) for p in task.problems("test")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    real = models_root() / "smollm2-135m-instruct"
    ap.add_argument("--model", default=str(real) if real.is_dir() else "world",
                    help="an HF directory (default: SmolLM2 from the model cache, else the shipped world model)")
    ap.add_argument("--small", action="store_true", help="a quick run: 2 problems, 64 new tokens")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--refill", type=int, default=32)
    ap.add_argument("--noise", choices=("head", "full", "both"), default="head",
                    help="top-p Gumbel noise computed for the nucleus head only (the sampler's path: the "
                         "same values, sampling.gumbel_at), for the whole vocabulary, or both: continuous "
                         "batching each way (the same tokens), no lock-step")
    a = ap.parse_args(argv)
    if a.small:
        a.problems, a.new_tokens = 2, 64
    if a.model != "world" and not Path(a.model).is_dir():
        print(f"--model: {a.model} is not a directory (run `swiftjax models fetch` first)", file=sys.stderr)
        return 2
    bb = load_backbone(a.model)
    task, questions = _questions(a.problems, a.model == "world")
    msgs = [q for q in questions for _ in range(a.n)]
    width = -(-max(len(bb.prompt_ids(q)) for q in questions) // 16) * 16
    ids, mask = bb.encode_prompts(msgs, width)
    ids, mask = np.asarray(ids), np.asarray(mask)
    cfg = SamplingConfig(max_new_tokens=a.new_tokens, temperature=0.7, top_p=0.95, eos_ids=bb.eos_ids,
                         pad_id=bb.pad_id)
    exact = sampling._gumbel_at_is_exact
    full_noise = lambda: setattr(sampling, "_gumbel_at_is_exact", lambda key=None: False)  # noqa: E731
    if a.noise == "full":
        full_noise()
    rows = len(msgs)
    keys = jax.random.split(jax.random.key(0), rows)
    print(f"{Path(a.model).name}: {a.problems} {task} problems x N={a.n} = {rows} rows, prompt width {width}, "
          f"{a.slots} rows in flight, up to {a.new_tokens} new tokens", flush=True)

    def lock_step():
        lengths, steps = [], 0
        for b, idx in enumerate(padded_batches(rows, a.slots)):
            out = generate(bb.model, take(ids, idx), take(mask, idx), key=jax.random.fold_in(keys[0], b), cfg=cfg,
                           prompt_groups=np.gcd(a.n, a.slots))
            ln = np.asarray(out.lengths)[idx >= 0]
            lengths.append(ln)
            steps += int(np.asarray(out.lengths).max())
        ln = np.concatenate(lengths)
        return ln, ln.sum() / (steps * a.slots)

    def continuous():
        stats = {}
        out = stream_generate(bb.model, ids, mask, row_keys=keys, cfg=cfg, slots=a.slots, segment=a.refill,
                              stats=stats)
        return out.lengths, stats["live_fraction"]

    def warm():  # compilation, on a few rows
        stream_generate(bb.model, ids[: a.slots + 1], mask[: a.slots + 1], row_keys=keys[: a.slots + 1], cfg=cfg,
                        slots=a.slots, segment=a.refill)

    def switch(to_exact: bool):
        def prepare():  # the noise path is chosen at trace time: recompile and warm up (untimed)
            setattr(sampling, "_gumbel_at_is_exact", exact) if to_exact else full_noise()
            jax.clear_caches()
            warm()
        return prepare

    if a.noise == "both":  # the same rows decoded continuously with each kind of noise (same tokens)
        runs = (("continuous, full noise", switch(False), continuous),
                ("continuous, head noise", switch(True), continuous))
    else:
        warm()
        generate(bb.model, ids[: a.slots], mask[: a.slots], key=keys[0], cfg=cfg, prompt_groups=np.gcd(a.n, a.slots))
        runs = (("lock-step", lambda: None, lock_step), ("continuous", lambda: None, continuous))
    res = []
    for name, prepare, fn in runs:
        prepare()
        t0 = time.perf_counter()
        lengths, useful = fn()
        dt = time.perf_counter() - t0
        res.append({"mode": name, "seconds": dt, "cand_s": rows / dt, "new_tok_s": float(np.sum(lengths)) / dt,
                    "mean_len": float(np.mean(lengths)), "live_fraction": useful})
    res[1]["speedup"] = res[0]["seconds"] / res[1]["seconds"]
    report("Best-of-N sampling: " + " vs ".join(r["mode"] for r in res), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
