"""Policy training in the world: SFT vs IRFT vs RFT from demonstrations, and DPO vs MRPO from
preference pairs against several reference models.

    swiftjax train-irft [configs/irft.yaml] [key=value ...]   # -> {out}/results.json, results.md
    swiftjax train-mrpo [configs/mrpo.yaml] [key=value ...]   # -> {out}/results.json, results.md

Both start from an SFT-only world model (``sft.model``: an HF directory, or null to train one
with :func:`swiftjax.world.model.train` on ``sft.world`` overrides of the world config,
into ``{out}/sft``; fewer demonstrations and steps than the shipped model).

IRFT (arXiv 2405.17888). The demonstrations (the SFT model's own training problems: the first
``demos.n`` problems of the train split, same seed and world config) are shuffled and split
into ``irft.stages`` disjoint chunks. Stage t: freeze a copy pi_t of the policy (its params as a
separate ``nnx.State``); generate y~ for the chunk's prompts with pi_t (greedy by default);
compute pi_t's sequence log-probs of the demonstrations and of y~ once; train ``irft.epochs``
epochs over the chunk on :func:`swiftjax.methods.preference.losses.irft_loss` (``r_t = beta*(log pi - log
pi_t)``, demo over generation) with a fresh optimizer (RMSprop, eps outside the sqrt, as the
paper; AdamW by config). Pairs whose generated response equals the demonstration token for token
are skipped: their loss is log 2 with zero gradient for any theta (both sides are the same
sequence), so they only dilute the batch. At the first step of every stage the policy equals
pi_t, so the loss is exactly log 2.

RFT (explicit reward). Round r: freeze pi_r, generate y~ for the round's chunk as above; train a
reward model = a linear value head ``r[b, t] = h[b, t] . w + c`` on pi_r's final (post-norm)
hidden states, frozen (features computed once per round; cheap: only D + 1 parameters train),
with the per-token Bradley-Terry loss from the first position where demo and generation differ
(:func:`swiftjax.methods.preference.losses.bt_token_reward_loss`; ``rft.rm.loss: sequence`` uses the reward
at the last token with :func:`~swiftjax.methods.preference.losses.bt_reward_loss`); then ``rft.pg.steps``
policy-gradient steps: sample responses from the current policy (temperature
``rft.pg.temperature``), score each by the head at its last token (on pi_r's states), and train
on :func:`swiftjax.methods.preference.losses.kl_regularised_pg_loss` against the frozen SFT model (beta,
baseline by config).

Evaluation (every method, after every stage / round when ``eval.each_stage``): on ``eval.n_problems``
held-out problems of ``eval.split``: greedy accuracy (%), pass@1 (% correct over ``eval.n_samples``
samples at ``eval.temperature``) and the mean per-token log-prob of the held-out gold solutions.

MRPO (arXiv 2405.16388). Candidates: ``candidates.path`` (a candidate jsonl) or, if null, sampled
from the initial policy on ``candidates.split`` problems (default: validation, disjoint from the
SFT demonstrations and from the evaluation split). Pairs: (correct, incorrect) of one prompt, at
most ``pairs.max_per_prompt`` per prompt, split by prompt into train / held-out
(:mod:`swiftjax.methods.preference.pairs`). References: index 0 = the policy's initialisation (primary, name
``init``), then ``references`` (each a model directory or a world model trained briefly with
other depth / seed). Every reference's sequence log-prob of every pair side is computed once and
stored in ``{out}/pairs.npz`` (on the reference's own tokenisation when its tokenizer differs).
Each method in ``methods`` (``loss: dpo`` with one reference, or ``loss: mrpo`` with a list of
reference names and weighting ``arwc`` (``convention: paper|code``) / ``uniform`` /
``validation`` (fixed weights from :func:`~swiftjax.methods.preference.losses.validation_weights` over the
*training* pairs: no per-example labels) and CTRO ``eps``) trains a copy of the initial policy
for the same ``train.steps`` at every pair count of ``pairs.counts`` and every seed of
``train.seeds``. Reported: held-out preference accuracy against the common primary reference
(``acc_primary``: ``beta*(lp - lp_init)`` of chosen above rejected), against the method's own
(virtual) reference (``acc_own``; ARWC's own reference uses the held-out labels for its weights,
as the method does), and of raw log-probs (``acc_logp``); held-out loss; greedy accuracy and
pass@1 on the evaluation problems.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax.methods.preference import losses as preference
from swiftjax import logprobs as lm  # noqa: module alias
from swiftjax.batching import epoch_batches
from swiftjax.config import config_from_argv
from swiftjax.data import candidates as cands
from swiftjax.methods.preference import pairs as prefs
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.world import model as wexp
from swiftjax.train import loop
from swiftjax.train.metrics import JsonlWriter, to_python

__all__ = [
    "IRFT_DEFAULTS",
    "MRPO_DEFAULTS",
    "irft_main",
    "mrpo_main",
    "run_irft",
    "run_mrpo",
    "ensure_world_model",
    "evaluate",
]

_SFT = {
    "model": None,  # an HF model directory; null: train one into {out}/sft
    "world": {      # overrides of swiftjax.world.model.DEFAULTS for that training
        "data": {"n_train": 4000, "n_val": 256, "max_len": 96},
        "train": {"max_steps": 600, "eval_every": 200, "ckpt_every": 200},
    },
}
_GEN = {"max_new_tokens": 64, "prompt_len": 64, "batch_size": 256}
_EVAL = {"split": "test", "n_problems": 500, "n_samples": 8, "temperature": 1.0, "seed": 0,
         "each_stage": True, "batch_size": 64, "max_len": 96}

IRFT_DEFAULTS: dict = {
    "seed": 0,
    "out": "runs/irft",
    "progress": True,
    "sft": copy.deepcopy(_SFT),
    "generation": dict(_GEN),
    "demos": {"n": 4000, "max_len": 160},
    "irft": {"enabled": True, "stages": 4, "beta": 0.1, "epochs": 2, "batch_size": 32,
             "temperature": 0.0,  # 0: greedy y~ (the reference); > 0: sampled
             "negatives": "all",  # all (the method) | incorrect: a diagnostic that uses the grader
             "contrast": "sequence",  # sequence (the method) | first_divergence: only the token where they part
             "optimizer": {"name": "rmsprop", "lr": 3e-6, "clip_norm": 1.0, "schedule": "cosine",
                           "final_lr_ratio": 0.0},
             "warmup_ratio": 0.1},
    "rft": {"enabled": True, "rounds": 4, "temperature": 0.0,
            "rm": {"loss": "token", "steps": 200, "batch_size": 64, "lr": 3e-3},
            "pg": {"steps": 25, "batch_size": 32, "beta": 0.05, "baseline": "loo", "temperature": 1.0},
            "optimizer": {"name": "adamw", "lr": 2e-5, "clip_norm": 1.0}},
    "eval": dict(_EVAL),
}

MRPO_DEFAULTS: dict = {
    "seed": 0,
    "out": "runs/mrpo",
    "progress": True,
    "sft": copy.deepcopy(_SFT),
    "generation": dict(_GEN),
    "candidates": {"path": None, "split": "validation", "n_problems": 2000, "n": 8, "temperature": 1.0,
                   "seed": 0},
    "pairs": {"max_per_prompt": 4, "held_out": 0.2, "max_len": 160, "counts": [128, 2048], "seed": 0},
    "references": [
        {"name": "depth2", "model": None,
         "world": {"seed": 1, "model": {"num_layers": 2}, "data": {"n_train": 4000},
                   "train": {"max_steps": 600, "eval_every": 200, "ckpt_every": 200}}},
        {"name": "seed2", "model": None,
         "world": {"seed": 2, "data": {"n_train": 4000},
                   "train": {"max_steps": 600, "eval_every": 200, "ckpt_every": 200}}},
    ],
    "methods": [
        {"name": "dpo", "loss": "dpo", "refs": ["init"]},
        {"name": "mrpo_k2", "loss": "mrpo", "refs": ["init", "depth2"], "weighting": "arwc",
         "convention": "paper", "eps": 0.1, "virtual": "harmonic"},
        {"name": "mrpo_k3", "loss": "mrpo", "refs": ["init", "depth2", "seed2"], "weighting": "arwc",
         "convention": "paper", "eps": 0.1, "virtual": "harmonic"},
        {"name": "mrpo_k2_uniform", "loss": "mrpo", "refs": ["init", "depth2"], "weighting": "uniform",
         "eps": 0.1, "virtual": "harmonic"},
        {"name": "mrpo_k3_uniform", "loss": "mrpo", "refs": ["init", "depth2", "seed2"],
         "weighting": "uniform", "eps": 0.1, "virtual": "harmonic"},
    ],
    "train": {"steps": 200, "batch_size": 16, "beta": 0.1, "seeds": [0],
              "optimizer": {"name": "adamw", "lr": 1e-5, "clip_norm": 1.0, "schedule": "cosine",
                            "final_lr_ratio": 0.0, "weight_decay": 0.0}},
    "eval": {**_EVAL, "pair_batch_size": 64},
}

PRIMARY = "init"


# =============================================================================== shared helpers


def _deep_merge(base: dict, over: Mapping | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _say(cfg, msg: str) -> None:
    if cfg.get("progress", True):
        print(msg, flush=True)


def _bar(cfg, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.get("progress", True), leave=False)


def ensure_world_model(spec: Mapping, out: Path, *, progress: bool = True) -> Path:
    """The model directory of ``spec``: ``spec['model']`` if given, else a world model trained
    with :func:`swiftjax.world.model.train` on ``world.DEFAULTS`` + ``spec['world']`` into
    ``out`` (``out/model``). A finished earlier training with the same config is reused; one
    with another config raises (delete the folder or choose another ``out``)."""
    if spec.get("model"):
        path = Path(spec["model"])
        if not (path / "model.safetensors").is_file():
            raise ValueError(f"model: expected an HF directory with model.safetensors, got {path}")
        return path
    wcfg = _deep_merge(wexp.DEFAULTS, spec.get("world"))
    wcfg["out"] = str(out)
    marker = Path(out) / "train_config.json"
    want = json.dumps(to_python(wcfg), sort_keys=True)
    model_dir = Path(out) / "model"
    if marker.is_file():
        if marker.read_text() != want:
            raise ValueError(f"{out}: holds a world model trained with another config; "
                             "delete the folder or set another out")
        if (model_dir / "model.safetensors").is_file():
            return model_dir
    Path(out).mkdir(parents=True, exist_ok=True)
    marker.write_text(want)
    return wexp.train(wcfg, progress=progress)


def _world_cfg(cfg: Mapping) -> world.WorldConfig:
    """The WorldConfig of the SFT training (demonstrations and evaluation use the same)."""
    return wexp.world_config(_deep_merge(wexp.DEFAULTS, cfg["sft"].get("world")))


def _sft_seed(cfg: Mapping) -> int:
    return int(_deep_merge(wexp.DEFAULTS, cfg["sft"].get("world")).get("seed", 0))


def _gen_cfg(cfg: Mapping, temperature: float) -> SamplingConfig:
    g = cfg["generation"]
    return SamplingConfig(max_new_tokens=g["max_new_tokens"], temperature=float(temperature),
                          eos_ids=(wtok.END_ID, wtok.EOS_ID), pad_id=wtok.PAD_ID)


def _sample(model, tok, problems, cfg, *, n: int, temperature: float, seed: int) -> list[dict]:
    g = cfg["generation"]
    return wexp.sample_candidates(model, tok, problems, n=n, temperature=float(temperature),
                                  max_new_tokens=g["max_new_tokens"], prompt_len=g["prompt_len"],
                                  batch_size=g["batch_size"], seed=seed,
                                  progress=cfg.get("progress", True))


def evaluate(model, tok, problems, cfg: Mapping) -> dict:
    """greedy (%), pass@1 (%, ``eval.n_samples`` samples per problem at ``eval.temperature``)
    and ``gold_logp`` (mean per-token log-prob of the problems' gold solutions)."""
    e = cfg["eval"]
    greedy = _sample(model, tok, problems, cfg, n=1, temperature=0.0, seed=e["seed"])
    samples = _sample(model, tok, problems, cfg, n=e["n_samples"], temperature=e["temperature"],
                      seed=e["seed"])
    arrs = wexp.encode_split(tok, problems, int(e["max_len"]))
    lp, ntok = lm.sequence_logprobs(model, arrs["ids"], arrs["attention_mask"], arrs["response_mask"],
                                    batch_size=e["batch_size"])
    return {"greedy": 100.0 * float(np.mean([r["correct"] for r in greedy])),
            "pass@1": 100.0 * float(np.mean([r["correct"] for r in samples])),
            "gold_logp": float(np.sum(lp) / max(np.sum(ntok), 1.0))}


def _clone(tree):
    return jax.tree.map(jnp.copy, tree)


_FLOAT_KEYS = ("lr", "weight_decay", "b1", "b2", "eps", "final_lr_ratio", "clip_norm", "rms_decay", "momentum")


def _opt_config(d: Mapping, total_steps: int, warmup_ratio: float = 0.0) -> loop.OptimizerConfig:
    """OptimizerConfig from a config mapping (YAML '1e-4' strings become floats); a cosine
    schedule gets ``total_steps`` and ``warmup_ratio * total_steps`` warm-up steps."""
    d = dict(d)
    for k in _FLOAT_KEYS:
        if isinstance(d.get(k), str):
            try:
                d[k] = float(d[k])
            except ValueError:
                raise ValueError(f"optimizer.{k}: expected a number, got {d[k]!r}") from None
    if d.get("schedule", "constant") == "cosine":
        total = max(int(total_steps), 1)
        d.setdefault("warmup_steps", min(int(round(warmup_ratio * total)), total - 1))
        d["total_steps"] = total if total > d["warmup_steps"] else d["warmup_steps"] + 1
    elif warmup_ratio and "warmup_steps" not in d:
        d["warmup_steps"] = int(round(warmup_ratio * max(int(total_steps), 1)))
    return loop.OptimizerConfig.from_dict(d)


def _seq_lp(model, ids, attn, resp):
    lp, m = lm.response_token_logprobs(model, ids, attn, resp)
    return jnp.sum(lp * m, axis=-1)


def _two_sided_lp(model, batch, a: str, b: str):
    """[B] summed response log-probs of sides ``a`` and ``b`` from one forward of [2B, T]."""
    ids = jnp.concatenate([batch[f"{a}_ids"], batch[f"{b}_ids"]])
    attn = jnp.concatenate([batch[f"{a}_attention_mask"], batch[f"{b}_attention_mask"]])
    resp = jnp.concatenate([batch[f"{a}_response_mask"], batch[f"{b}_response_mask"]])
    s = _seq_lp(model, ids, attn, resp)
    B = batch[f"{a}_ids"].shape[0]
    return s[:B], s[B:]


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def _run_steps(state, step_fn, batch_iter, n_steps: int, writer, tag: str, cfg, step0: int = 0):
    """Run ``n_steps`` steps; returns (state, list of host metric dicts)."""
    hist = []
    bar = _bar(cfg, n_steps, tag)
    for i in range(n_steps):
        state, m = step_fn(state, next(batch_iter))
        h = _host(m)
        hist.append(h)
        writer.write(step0 + i + 1, {"phase": tag, **h})
        bar.update(1)
        bar.set_postfix(loss=f"{h['loss']:.4g}", refresh=False)
    bar.close()
    return state, hist


def _cycle(batches):
    """An endless iterator over the epochs of an ``epoch_batches`` callable."""
    epoch = 0
    while True:
        any_ = False
        for b in batches(epoch):
            any_ = True
            yield b
        if not any_:
            raise ValueError("training data: expected at least one batch per epoch, got none")
        epoch += 1


def _write_results(out: Path, results: Mapping, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_python(results), indent=2) + "\n")
    (out / "results.md").write_text(md)


def _fmt(x, nd=1):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


# =============================================================================== IRFT / RFT


def _response_ids(row) -> list[int]:
    return [int(t) for t in row["token_ids"]]


def _demo_response_ids(tok, problem) -> list[int]:
    return wtok.encode(tok, problem.solution) + [wtok.END_ID]


def _stage_pairs(frozen_model, tok, problems, cfg, temperature: float, seed: int, negatives: str = "all",
                 contrast: str = "sequence"):
    """Generate y~ with the frozen model and encode (demo, y~) pairs with the same layout.

    ``negatives``: ``all`` keeps every y~ that differs from its demonstration (the method: it
    sees demonstrations only); ``incorrect`` also drops the y~ the grader marks correct, a
    diagnostic that asks whether pushing down correct generations is what hurts.
    ``contrast``: ``sequence`` scores whole responses (the method); ``first_divergence`` cuts
    both response masks after the first token where demonstration and y~ differ
    (:func:`prefs.through_first_divergence`), so the tokens that follow a slip are not pushed down.

    Returns (batch arrays, info): arrays ``demo_*`` / ``gen_*`` [n, T] for the kept pairs;
    info: counts of generated, identical-to-demo (skipped), too long (skipped), correct y~."""
    rows = _sample(frozen_model, tok, problems, cfg, n=1, temperature=temperature, seed=seed)
    T = cfg["demos"]["max_len"]
    qs = [p.question for p in problems]
    demo_resp = [_demo_response_ids(tok, p) for p in problems]
    gen_resp = [_response_ids(r) for r in rows]
    same = np.array([d == g for d, g in zip(demo_resp, gen_resp)])
    demo, kd = prefs.encode_generated(tok, qs, demo_resp, T, drop_long=True)
    gen, kg = prefs.encode_generated(tok, qs, gen_resp, T, drop_long=True)
    ok = np.zeros(len(problems), bool)
    ok[np.intersect1d(kd, kg)] = True
    correct = np.array([bool(r["correct"]) for r in rows])
    keep = ok & ~same & (~correct if negatives == "incorrect" else True)
    rd = np.searchsorted(kd, np.flatnonzero(keep))
    rg = np.searchsorted(kg, np.flatnonzero(keep))
    arrays = {**{f"demo_{k}": v[rd] for k, v in demo.items()}, **{f"gen_{k}": v[rg] for k, v in gen.items()}}
    if contrast == "first_divergence" and keep.any():
        arrays["demo_response_mask"], arrays["gen_response_mask"] = prefs.through_first_divergence(
            {k: arrays[f"demo_{k}"] for k in ("ids", "response_mask")},
            {k: arrays[f"gen_{k}"] for k in ("ids", "response_mask")})
    info = {"prompts": len(problems), "skipped_identical": int(same.sum()),
            "skipped_long": int((~ok).sum()), "pairs": int(keep.sum()),
            "skipped_correct": int((ok & ~same & correct).sum()) if negatives == "incorrect" else 0,
            "gen_correct": 100.0 * float(np.mean(correct))}
    return arrays, info, np.flatnonzero(keep)


def _irft_loss_fn(beta: float):
    def fn(model, batch, rng):
        pi_d, pi_g = _two_sided_lp(model, batch, "demo", "gen")
        loss, m = preference.irft_loss(pi_d, pi_g, batch["frozen_demo"], batch["frozen_gen"], beta)
        return loss, {k: v for k, v in m.items() if k != "loss"}

    return fn


def _chunks(n: int, parts: int, seed: int) -> list[np.ndarray]:
    if parts < 1:
        raise ValueError(f"stages/rounds: expected >= 1, got {parts}")
    size = n // parts
    if size < 1:
        raise ValueError(f"demos.n={n}: expected at least one demonstration per stage ({parts} stages)")
    order = np.random.default_rng([seed, 17]).permutation(n)
    return [np.sort(order[i * size:(i + 1) * size]) for i in range(parts)]


def _model_from(graphdef, params, rest):
    return loop.nnx_merge(graphdef, params, rest)


def run_irft_stages(model, tok, demos, eval_problems, cfg, writer) -> tuple[Any, list, list]:
    """IRFT from ``model`` (not modified); returns (final model, stage records, eval rows)."""
    c = cfg["irft"]
    if c["negatives"] not in ("all", "incorrect"):
        raise ValueError(f"irft.negatives: expected 'all' or 'incorrect', got {c['negatives']!r}")
    if c["contrast"] not in ("sequence", "first_divergence"):
        raise ValueError(f"irft.contrast: expected 'sequence' or 'first_divergence', got {c['contrast']!r}")
    graphdef, params, rest = loop.nnx_split(model)
    params = _clone(params)
    chunks = _chunks(len(demos), c["stages"], cfg["seed"])
    bs_cfg = int(c["batch_size"])
    steps_max = int(c["epochs"]) * max(len(chunks[0]) // min(bs_cfg, len(chunks[0])), 1)
    opt = _opt_config(c["optimizer"], steps_max, float(c.get("warmup_ratio", 0.0)))
    tx = loop.make_optimizer(opt)
    step_fn = loop.make_train_step(loop.nnx_loss(graphdef, _irft_loss_fn(float(c["beta"]))), tx,
                                   lr_fn=loop.learning_rate_fn(opt))
    records, evals = [], []
    gstep = 0
    for t, idx in enumerate(chunks, 1):
        t0 = time.time()
        frozen = _clone(params)  # pi_t: a separate, never-trained copy
        frozen_model = _model_from(graphdef, frozen, rest)
        probs = [demos[i] for i in idx]
        arrays, info, _ = _stage_pairs(frozen_model, tok, probs, cfg, float(c["temperature"]),
                                       seed=cfg["seed"] * 1000 + t, negatives=c["negatives"], contrast=c["contrast"])
        rec = {"stage": t, **info}
        n = info["pairs"]
        if n == 0:
            rec.update(steps=0, note="every generation equals its demonstration: nothing to train")
            records.append(rec)
            continue
        eb = cfg["eval"]["batch_size"]
        arrays["frozen_demo"] = lm.sequence_logprobs(frozen_model, arrays["demo_ids"], arrays["demo_attention_mask"],
                                                     arrays["demo_response_mask"], batch_size=eb)[0]
        arrays["frozen_gen"] = lm.sequence_logprobs(frozen_model, arrays["gen_ids"], arrays["gen_attention_mask"],
                                                    arrays["gen_response_mask"], batch_size=eb)[0]
        bs = min(bs_cfg, n)
        batches = epoch_batches(arrays, bs, cfg["seed"] * 1000 + t)
        steps = int(c["epochs"]) * batches.steps_per_epoch
        state = loop.init_state(params, tx, cfg["seed"] * 1000 + t, frozen=rest)  # optimizer restarts
        state, hist = _run_steps(state, step_fn, _cycle(batches), steps, writer, f"irft/stage{t}", cfg, gstep)
        gstep += steps
        params = state.params
        rec.update(steps=steps, batch_size=bs, loss_first=hist[0]["loss"], loss_last=hist[-1]["loss"],
                   accuracy_last=hist[-1]["accuracy"], margin_last=hist[-1]["reward_margin"],
                   seconds=time.time() - t0)
        records.append(rec)
        _say(cfg, f"IRFT stage {t}: {n} pairs ({info['skipped_identical']} identical skipped), {steps} steps, "
                  f"loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}")
        if cfg["eval"]["each_stage"] or t == len(chunks):
            ev = evaluate(_model_from(graphdef, params, rest), tok, eval_problems, cfg)
            evals.append({"method": "IRFT", "stage": t, **ev})
            writer.write(gstep, {"phase": f"irft/eval{t}", **ev})
    final = _model_from(graphdef, _clone(params), rest)
    return final, records, evals


# ----------------------------------------------------------------------------------- RFT


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _final_hidden(graphdef, state, ids, attn):
    model = nnx.merge(graphdef, state)
    return model(ids, attn, output_hidden_states=True, compute_logits=False).hidden_states[-1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_lp(graphdef, state, ids, attn, resp):
    model = nnx.merge(graphdef, state)
    return lm.response_token_logprobs(model, ids, attn, resp)[0]


def _batched(fn, model, arrays: list, batch_size: int) -> np.ndarray:
    """``fn(graphdef, state, *arrays[rows])`` over fixed-size row batches (last one padded)."""
    graphdef, state = nnx.split(model)
    n = arrays[0].shape[0]
    out = []
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        part = [np.asarray(a[s:e]) for a in arrays]
        if e - s < batch_size:
            part = [np.concatenate([a, np.repeat(a[-1:], batch_size - (e - s), 0)]) for a in part]
        out.append(np.asarray(fn(graphdef, state, *(jnp.asarray(a) for a in part)))[: e - s])
    return np.concatenate(out)


def _head_rewards(head, h):
    return jnp.einsum("btd,d->bt", h, head["w"]) + head["b"]


def _last_index(mask):
    """Index of the last nonzero entry of each row of a [B, T] mask (right or left padding)."""
    T = mask.shape[1]
    return T - 1 - jnp.argmax(mask[:, ::-1] != 0, axis=1)


def _rm_loss_fn(kind: str):
    def fn(head, batch, rng):
        r_d = _head_rewards(head, batch["h_demo"])
        r_g = _head_rewards(head, batch["h_gen"])
        if kind == "token":
            loss, m = preference.bt_token_reward_loss(r_d, r_g, batch["demo_ids"], batch["gen_ids"],
                                                      batch["demo_attention_mask"], batch["gen_attention_mask"])
            m = {"accuracy": m["accuracy"]}
        else:
            ld = _last_index(batch["demo_attention_mask"])
            lg = _last_index(batch["gen_attention_mask"])
            sd = jnp.take_along_axis(r_d, ld[:, None], 1)[:, 0]
            sg = jnp.take_along_axis(r_g, lg[:, None], 1)[:, 0]
            loss, m = preference.bt_reward_loss(sd, sg)
            m = {"accuracy": m["accuracy"]}
        return loss, m

    return fn


def train_reward_head(feature_model, arrays, cfg, writer, tag: str, seed: int):
    """Fit a linear value head on the frozen model's final hidden states of demo and y~.

    Returns (head {w [D], b []}, history)."""
    r = cfg["rft"]["rm"]
    if r["loss"] not in ("token", "sequence"):
        raise ValueError(f"rft.rm.loss: expected 'token' or 'sequence', got {r['loss']!r}")
    # crop the all-padding tail shared by every row
    L = int(max(arrays["demo_attention_mask"].sum(1).max(), arrays["gen_attention_mask"].sum(1).max()))
    arr = {k: v[:, :L] for k, v in arrays.items() if k.startswith(("demo_", "gen_"))}
    eb = cfg["eval"]["batch_size"]
    arr["h_demo"] = _batched(_final_hidden, feature_model, [arr["demo_ids"], arr["demo_attention_mask"]], eb)
    arr["h_gen"] = _batched(_final_hidden, feature_model, [arr["gen_ids"], arr["gen_attention_mask"]], eb)
    D = arr["h_demo"].shape[-1]
    head = {"w": jnp.zeros((D,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    opt = loop.OptimizerConfig(name="adamw", lr=float(r["lr"]), weight_decay=float(r.get("weight_decay", 0.0)))
    tx = loop.make_optimizer(opt)
    step_fn = loop.make_train_step(_rm_loss_fn(r["loss"]), tx)
    n = arr["demo_ids"].shape[0]
    batches = epoch_batches(arr, min(int(r["batch_size"]), n), seed)
    state = loop.init_state(head, tx, seed)
    state, hist = _run_steps(state, step_fn, _cycle(batches), int(r["steps"]), writer, tag, cfg)
    return state.params, hist


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rm_score(graphdef, state, head, ids, attn):
    model = nnx.merge(graphdef, state)
    h = model(ids, attn, output_hidden_states=True, compute_logits=False).hidden_states[-1]
    r = _head_rewards(head, h)
    return jnp.take_along_axis(r, _last_index(attn)[:, None], 1)[:, 0]


def _pg_loss_fn(beta: float, baseline: str):
    def fn(model, batch, rng):
        lp, m = lm.response_token_logprobs(model, batch["ids"], batch["attention_mask"], batch["response_mask"])
        loss, met = preference.kl_regularised_pg_loss(lp, batch["ref_lp"], batch["reward"], m, beta, baseline)
        return loss, {k: v for k, v in met.items() if k != "loss"}

    return fn


def run_rft_rounds(model, tok, demos, eval_problems, cfg, writer) -> tuple[Any, list, list]:
    """RFT from ``model`` (the SFT policy, also the KL reference); returns
    (final model, round records, eval rows)."""
    c = cfg["rft"]
    pg = c["pg"]
    g = cfg["generation"]
    graphdef, params, rest = loop.nnx_split(model)
    ref_model = _model_from(graphdef, _clone(params), rest)  # frozen SFT reference
    ref_gd, ref_state = nnx.split(ref_model)
    params = _clone(params)
    chunks = _chunks(len(demos), c["rounds"], cfg["seed"] + 1)
    opt = _opt_config(c["optimizer"], int(pg["steps"]))
    tx = loop.make_optimizer(opt)
    if pg["baseline"] not in ("mean", "loo", "none"):
        raise ValueError(f"rft.pg.baseline: expected 'mean', 'loo' or 'none', got {pg['baseline']!r}")
    step_fn = loop.make_train_step(loop.nnx_loss(graphdef, _pg_loss_fn(float(pg["beta"]), pg["baseline"])), tx)
    scfg = _gen_cfg(cfg, float(pg["temperature"]))
    B, P, N = int(pg["batch_size"]), int(g["prompt_len"]), int(g["max_new_tokens"])
    key = jax.random.fold_in(jax.random.key(cfg["seed"]), 7)
    records, evals = [], []
    gstep = 0
    for r, idx in enumerate(chunks, 1):
        t0 = time.time()
        frozen = _clone(params)
        frozen_model = _model_from(graphdef, frozen, rest)
        probs = [demos[i] for i in idx]
        arrays, info, _ = _stage_pairs(frozen_model, tok, probs, cfg, float(c["temperature"]),
                                       seed=cfg["seed"] * 1000 + 500 + r)
        rec = {"round": r, **info}
        if info["pairs"] == 0:
            rec.update(note="every generation equals its demonstration: no reward-model data")
            records.append(rec)
            continue
        head, rm_hist = train_reward_head(frozen_model, arrays, cfg, writer, f"rft/rm{r}", cfg["seed"] * 1000 + r)
        rec.update(rm_loss_first=rm_hist[0]["loss"], rm_loss_last=rm_hist[-1]["loss"],
                   rm_accuracy_last=rm_hist[-1]["accuracy"])
        fgd, fstate = nnx.split(frozen_model)
        qs = [p.question for p in probs]
        pids, pmask = wtok.encode_prompts(tok, qs, P)
        order = np.random.default_rng([cfg["seed"], r, 3]).permutation(len(qs))
        state = loop.init_state(params, tx, cfg["seed"] * 1000 + r, frozen=rest)  # optimizer restarts
        hist = []
        bar = _bar(cfg, int(pg["steps"]), f"rft/pg{r}")
        for k in range(int(pg["steps"])):
            sel = order[np.arange(k * B, (k + 1) * B) % len(qs)]
            key, sub = jax.random.split(key)
            policy = _model_from(graphdef, state.params, rest)
            out = generate(policy, pids[sel], pmask[sel], key=sub, cfg=scfg)
            valid = (np.arange(N)[None, :] < np.asarray(out.lengths)[:, None]).astype(np.int32)
            ids = jnp.asarray(np.concatenate([pids[sel], np.asarray(out.tokens)], 1))
            attn = jnp.asarray(np.concatenate([pmask[sel], valid], 1))
            resp = jnp.asarray(np.concatenate([np.zeros_like(pmask[sel]), valid], 1))
            reward = _rm_score(fgd, fstate, head, ids, attn)
            ref_lp = _token_lp(ref_gd, ref_state, ids, attn, resp)
            batch = {"ids": ids, "attention_mask": attn, "response_mask": resp, "ref_lp": ref_lp,
                     "reward": reward}
            state, m = step_fn(state, batch)
            h = _host(m)
            hist.append(h)
            writer.write(gstep + k + 1, {"phase": f"rft/pg{r}", **h})
            bar.update(1)
        bar.close()
        gstep += int(pg["steps"])
        params = state.params
        if hist:
            rec.update(pg_steps=len(hist), pg_loss_last=hist[-1]["loss"], reward_first=hist[0]["reward"],
                       reward_last=hist[-1]["reward"], kl_last=hist[-1]["kl"])
        rec["seconds"] = time.time() - t0
        records.append(rec)
        _say(cfg, f"RFT round {r}: RM loss {rec['rm_loss_first']:.4f} -> {rec['rm_loss_last']:.4f}, "
                  f"reward {rec.get('reward_first', float('nan')):.3f} -> {rec.get('reward_last', float('nan')):.3f}")
        if cfg["eval"]["each_stage"] or r == len(chunks):
            ev = evaluate(_model_from(graphdef, params, rest), tok, eval_problems, cfg)
            evals.append({"method": "RFT", "stage": r, **ev})
            writer.write(gstep, {"phase": f"rft/eval{r}", **ev})
    final = _model_from(graphdef, _clone(params), rest)
    return final, records, evals


def _irft_markdown(res: Mapping) -> str:
    lines = ["# SFT vs IRFT vs RFT in the world", "",
             f"SFT model: `{res['sft_model']}`; {res['n_demos']} demonstrations; evaluation on "
             f"{res['n_eval']} held-out `{res['eval_split']}` problems (pass@1 over "
             f"{res['n_samples']} samples at T={res['eval_temperature']}).", "",
             "| method | stage | greedy % | pass@1 % | gold log-prob / token |",
             "|---|---:|---:|---:|---:|"]
    for row in res["evals"]:
        lines.append(f"| {row['method']} | {row['stage']} | {_fmt(row['greedy'])} | {_fmt(row['pass@1'])} | "
                     f"{_fmt(row['gold_logp'], 4)} |")
    if res.get("irft_stages"):
        ic = res.get("config", {}).get("irft", {})
        what = "generations identical to the demonstration" + (
            " and those graded correct (diagnostic: negatives = incorrect)"
            if ic.get("negatives", "all") == "incorrect" else "")
        if ic.get("contrast", "sequence") == "first_divergence":
            what += "; each pair scored only through the first token where demonstration and y~ differ"
        lines += ["", f"IRFT stages (pairs = prompts minus {what}):", "",
                  "| stage | pairs | identical | correct dropped | y~ correct % | steps | loss first | loss last | acc last |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["irft_stages"]:
            lines.append(f"| {s['stage']} | {s['pairs']} | {s['skipped_identical']} | {s.get('skipped_correct', 0)} | "
                         f"{_fmt(s['gen_correct'])} | "
                         f"{s.get('steps', 0)} | {_fmt(s.get('loss_first'), 4)} | {_fmt(s.get('loss_last'), 4)} | "
                         f"{_fmt(s.get('accuracy_last'), 3)} |")
    if res.get("rft_rounds"):
        lines += ["", "RFT rounds:", "",
                  "| round | pairs | RM loss first | RM loss last | RM acc | reward first | reward last | KL last |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["rft_rounds"]:
            lines.append(f"| {s['round']} | {s['pairs']} | {_fmt(s.get('rm_loss_first'), 4)} | "
                         f"{_fmt(s.get('rm_loss_last'), 4)} | {_fmt(s.get('rm_accuracy_last'), 3)} | "
                         f"{_fmt(s.get('reward_first'), 3)} | {_fmt(s.get('reward_last'), 3)} | "
                         f"{_fmt(s.get('kl_last'), 3)} |")
    return "\n".join(lines) + "\n"


def run_irft(cfg: dict) -> dict:
    """SFT -> IRFT (T stages) and SFT -> RFT; writes results.json / results.md under ``out``."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sft_dir = ensure_world_model(cfg["sft"], out / "sft", progress=cfg.get("progress", True))
    model, _, tok = wexp.load_world_model(sft_dir)
    wcfg = _world_cfg(cfg)
    demos = world.make_split("train", int(cfg["demos"]["n"]), wcfg, seed=_sft_seed(cfg))
    e = cfg["eval"]
    eval_problems = world.make_split(e["split"], int(e["n_problems"]), wcfg, seed=_sft_seed(cfg))
    writer = JsonlWriter(out / "metrics.jsonl")
    evals = [{"method": "SFT", "stage": 0, **evaluate(model, tok, eval_problems, cfg)}]
    _say(cfg, f"SFT: {evals[0]}")
    res: dict = {"sft_model": str(sft_dir), "n_demos": len(demos), "n_eval": len(eval_problems),
                 "eval_split": e["split"], "n_samples": e["n_samples"], "eval_temperature": e["temperature"],
                 "config": cfg}
    try:
        if cfg["irft"]["enabled"]:
            _, stages, ev = run_irft_stages(model, tok, demos, eval_problems, cfg, writer)
            evals += ev
            res["irft_stages"] = stages
        if cfg["rft"]["enabled"]:
            _, rounds, ev = run_rft_rounds(model, tok, demos, eval_problems, cfg, writer)
            evals += ev
            res["rft_rounds"] = rounds
    finally:
        writer.close()
    res["evals"] = evals
    res["seconds"] = time.time() - t0
    _write_results(out, res, _irft_markdown(res))
    _say(cfg, f"wrote {out / 'results.md'}")
    return res


def irft_main(argv) -> int:
    """``swiftjax train-irft [CONFIG.yaml] [key=value ...]``."""
    cfg = config_from_argv(argv, IRFT_DEFAULTS)
    run_irft(cfg)
    return 0


# =============================================================================== DPO vs MRPO


@dataclasses.dataclass(frozen=True)
class Method:
    """One preference method: ``loss`` 'dpo' (refs = [primary]) or 'mrpo' (refs: names, index 0
    the primary); weighting 'arwc' | 'uniform' | 'validation'; convention; eps (None: no CTRO);
    virtual 'harmonic' | 'geometric'."""

    name: str
    loss: str
    refs: tuple[str, ...]
    weighting: str = "arwc"
    convention: str = "paper"
    eps: float | None = 0.1
    virtual: str = "harmonic"

    @classmethod
    def from_dict(cls, d: Mapping, known_refs) -> "Method":
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise ValueError(f"method {d.get('name')!r}: unknown keys {bad}; expected some of {sorted(fields)}")
        d["refs"] = tuple(d.get("refs") or (PRIMARY,))
        m = cls(**d)
        if m.loss not in ("dpo", "mrpo"):
            raise ValueError(f"method {m.name!r}: loss expected 'dpo' or 'mrpo', got {m.loss!r}")
        if m.refs[0] != PRIMARY:
            raise ValueError(f"method {m.name!r}: refs must start with the primary reference {PRIMARY!r}, "
                             f"got {list(m.refs)}")
        unknown = [r for r in m.refs if r not in known_refs]
        if unknown:
            raise ValueError(f"method {m.name!r}: unknown references {unknown}; known: {list(known_refs)}")
        if m.loss == "dpo" and len(m.refs) != 1:
            raise ValueError(f"method {m.name!r}: dpo takes exactly one reference, got {list(m.refs)}")
        if m.weighting not in ("arwc", "uniform", "validation"):
            raise ValueError(f"method {m.name!r}: weighting expected arwc|uniform|validation, got {m.weighting!r}")
        return m


def _pref_loss(method: Method, beta: float, weights):
    """loss(pi_w, pi_l, ref_w [K, B], ref_l [K, B]) -> (loss, metrics) for ``method``."""
    if method.loss == "dpo":
        def fn(pi_w, pi_l, ref_w, ref_l):
            return preference.dpo_loss(pi_w, pi_l, ref_w[0], ref_l[0], beta)
        return fn
    weighting = "fixed" if method.weighting == "validation" else method.weighting
    w = None if weights is None else jnp.asarray(weights, jnp.float32)

    def fn(pi_w, pi_l, ref_w, ref_l):
        return preference.mrpo_loss(pi_w, pi_l, ref_w, ref_l, beta, method.eps, weighting=weighting,
                                    convention=method.convention, virtual=method.virtual, weights=w)
    return fn


def _pair_train_fn(method: Method, beta: float, weights):
    loss = _pref_loss(method, beta, weights)

    def fn(model, batch, rng):
        pi_w, pi_l = _two_sided_lp(model, batch, "chosen", "rejected")
        lval, m = loss(pi_w, pi_l, batch["ref_chosen"].T, batch["ref_rejected"].T)
        return lval, {k: v for k, v in m.items() if k in ("accuracy", "reward_margin", "accuracy_primary")}

    return fn


def _ref_models(cfg, out: Path, policy_dir: Path):
    """[(name, model dir)] with the primary (the policy's init) first."""
    progress = cfg.get("progress", True)
    refs = [(PRIMARY, policy_dir)]
    names = {PRIMARY}
    for i, spec in enumerate(cfg["references"] or []):
        name = spec.get("name")
        if not name or name in names:
            raise ValueError(f"references[{i}]: expected a distinct name (not {PRIMARY!r}), got {name!r}")
        names.add(name)
        refs.append((name, ensure_world_model(spec, out / "refs" / name, progress=progress)))
    return refs


def _held_out_scores(model, data, eval_bs: int):
    lw, _ = lm.sequence_logprobs(model, data["chosen_ids"], data["chosen_attention_mask"],
                                 data["chosen_response_mask"], batch_size=eval_bs)
    ll, _ = lm.sequence_logprobs(model, data["rejected_ids"], data["rejected_attention_mask"],
                                 data["rejected_response_mask"], batch_size=eval_bs)
    return lw.astype(np.float32), ll.astype(np.float32)


def _pref_metrics(pi_w, pi_l, data, method: Method | None, ref_index, beta, weights):
    """Held-out preference metrics of policy log-probs [N] against the stored references."""
    rw, rl = data["ref_chosen"], data["ref_rejected"]
    out = {"acc_primary": 100.0 * float(np.mean((pi_w - rw[0]) > (pi_l - rl[0]))),
           "acc_logp": 100.0 * float(np.mean(pi_w > pi_l))}
    if method is not None:
        loss, m = _pref_loss(method, beta, weights)(jnp.asarray(pi_w), jnp.asarray(pi_l),
                                                    jnp.asarray(rw[ref_index]), jnp.asarray(rl[ref_index]))
        out["acc_own"] = 100.0 * float(m["accuracy"])
        out["loss"] = float(loss)
    return out


def _pairs_meta(cfg, policy_sha, refs, cand_source) -> str:
    return json.dumps(to_python({"policy": policy_sha, "refs": [[n, wexp.model_digest(d)] for n, d in refs],
                                 "candidates": cand_source, "pairs": {k: v for k, v in cfg["pairs"].items()
                                                                      if k != "counts"}}), sort_keys=True)


def build_mrpo_data(cfg, out: Path, policy_dir: Path, refs, tok) -> dict:
    """Candidates -> pairs -> encoded pairs + every reference's log-probs, stored once in
    ``{out}/pairs.npz`` (reused while the inputs are the same)."""
    c, pc = cfg["candidates"], cfg["pairs"]
    if c["path"]:
        cand_path = Path(c["path"])
        source = str(cand_path)
    else:
        cand_path = out / f"candidates_{c['split']}.jsonl"
        source = {**{k: v for k, v in c.items() if k != "path"}, "generation": cfg["generation"]}
    policy_sha = wexp.model_digest(policy_dir)
    meta = _pairs_meta(cfg, policy_sha, refs, source)
    store = out / "pairs.npz"
    if store.is_file():
        data = prefs.load_pair_data(store)
        if str(data.get("meta", "")) == meta:
            return data
    if c["path"]:
        rows = cands.read_candidates(cand_path)
    else:
        def sample():
            model, _, _ = wexp.load_world_model(policy_dir)
            problems = world.make_split(c["split"], int(c["n_problems"]), _world_cfg(cfg), seed=_sft_seed(cfg))
            return _sample(model, tok, problems, cfg, n=int(c["n"]), temperature=float(c["temperature"]),
                           seed=int(c["seed"]))

        key = to_python({"policy_sha256": policy_sha, "world": cfg.get("world") or {},
                         "split_seed": _sft_seed(cfg), **source})
        rows = cands.cached_candidates(cand_path, key, sample)
    pairs = prefs.make_pairs(rows, int(pc["max_per_prompt"]), seed=int(pc["seed"]))
    if not pairs:
        raise ValueError(f"{cand_path}: no prompt has both a correct and an incorrect candidate")
    references = []
    for name, d in refs:
        m, _, rtok = wexp.load_world_model(d)
        references.append(prefs.Reference(name, m, rtok))
    data = prefs.build_pair_data(tok, pairs, references, int(pc["max_len"]), drop_long=True,
                                 batch_size=int(cfg["eval"]["pair_batch_size"]))
    kept = [{k: (str(data[k][i]) if data[k].dtype.kind == "U" else int(data[k][i])) for k in prefs.PAIR_KEYS}
            for i in range(len(data["prompt_id"]))]
    train, held = prefs.split_by_prompt(kept, pc["held_out"], seed=int(pc["seed"]))
    held_ids = {p["prompt_id"] for p in held}
    data["held_out"] = np.array([p in held_ids for p in data["prompt_id"].tolist()], bool)
    data["meta"] = np.array(meta)
    prefs.save_pair_data(store, data)
    return data


def _weights_for(method: Method, train_data, ref_index):
    if method.loss == "mrpo" and method.weighting == "validation":
        return np.asarray(preference.validation_weights(jnp.asarray(train_data["ref_chosen"][ref_index]),
                                                        jnp.asarray(train_data["ref_rejected"][ref_index])))
    return None


def train_preference(model, data, method: Method, ref_index, cfg, seed: int, writer, tag: str,
                     step_cache: dict | None = None):
    """Train a copy of ``model`` on pairs ``data`` (with stored reference log-probs) for
    ``train.steps``; returns (trained model, history, weights used or None).

    ``step_cache``: a dict reused across calls, so runs of the same method (other pair counts or
    seeds) reuse one compiled train step (the optimizer state is fresh every call)."""
    tc = cfg["train"]
    graphdef, params, rest = loop.nnx_split(model)
    params = _clone(params)
    weights = _weights_for(method, data, ref_index)
    arrays = {k: data[k] for k in data if k.startswith(("chosen_", "rejected_")) and k.endswith(
        ("_ids", "_attention_mask", "_response_mask"))}
    arrays["ref_chosen"] = np.ascontiguousarray(data["ref_chosen"][ref_index].T)  # [N, K]
    arrays["ref_rejected"] = np.ascontiguousarray(data["ref_rejected"][ref_index].T)
    n = arrays["chosen_ids"].shape[0]
    steps = int(tc["steps"])
    opt = _opt_config(tc["optimizer"], steps)
    key = (graphdef, method, float(tc["beta"]), None if weights is None else tuple(np.round(weights, 7).tolist()),
           opt)
    cache = {} if step_cache is None else step_cache
    if key not in cache:
        tx = loop.make_optimizer(opt)
        cache[key] = (tx, loop.make_train_step(
            loop.nnx_loss(graphdef, _pair_train_fn(method, float(tc["beta"]), weights)), tx))
    tx, step_fn = cache[key]
    batches = epoch_batches(arrays, min(int(tc["batch_size"]), n), seed)
    state = loop.init_state(params, tx, seed, frozen=rest)
    state, hist = _run_steps(state, step_fn, _cycle(batches), steps, writer, tag, cfg)
    return _model_from(graphdef, state.params, rest), hist, weights


def _mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def _se_pct(p_pct: float, n: int) -> float:
    p = p_pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _verdict(rows, n_held: int, n_eval: int) -> list[str]:
    """Plain statements: every MRPO variant against the DPO run at each pair count, with 2-SE
    bands (binomial standard errors of the two percentages, combined)."""
    counts = sorted({r["pairs"] for r in rows if r["kind"] in ("dpo", "mrpo")})
    out, tally = [], {"acc_primary": [0, 0, 0], "pass@1": [0, 0, 0]}  # mrpo better / dpo better / tie
    for n in counts:
        dpos = [r for r in rows if r["pairs"] == n and r["kind"] == "dpo"]
        if not dpos:
            continue
        d = dpos[0]
        for r in (r for r in rows if r["pairs"] == n and r["kind"] == "mrpo"):
            parts = []
            for key, N in (("acc_primary", n_held), ("pass@1", n_eval)):
                a, b = r.get(key), d.get(key)
                if a is None or b is None:
                    continue
                band = 2 * math.sqrt(_se_pct(a, N) ** 2 + _se_pct(b, N) ** 2)
                diff = a - b
                if diff > band:
                    tally[key][0] += 1
                    word = "MRPO better"
                elif diff < -band:
                    tally[key][1] += 1
                    word = "DPO better"
                else:
                    tally[key][2] += 1
                    word = "within noise"
                parts.append(f"{key} {a:.1f} vs {b:.1f} ({diff:+.1f}, 2-SE band ±{band:.1f}: {word})")
            out.append(f"- {n} pairs, {r['method']} vs {d['method']}: " + "; ".join(parts))
    summary = []
    for key, (m, dd, t) in tally.items():
        tot = m + dd + t
        if tot:
            summary.append(f"{key}: MRPO better in {m}/{tot} comparisons, DPO better in {dd}/{tot}, "
                           f"within noise in {t}/{tot}")
    return (["**What this run shows:** " + "; ".join(summary) + "."] if summary else []) + [""] + out


def _mrpo_markdown(res: Mapping) -> str:
    lines = ["# DPO vs MRPO in the world", "",
             f"Policy init (primary reference `init`): `{res['policy_model']}`. References: "
             + ", ".join(f"`{n}` ({d})" for n, d in res["references"]) + ".",
             f"Pairs: {res['n_pairs_train']} training / {res['n_pairs_held']} held-out (split by prompt); "
             f"evaluation on {res['n_eval']} `{res['eval_split']}` problems (pass@1 over {res['n_samples']} samples).",
             "Preference accuracy on held-out pairs: `acc_primary` against the common reference (the policy's "
             "init), `acc_own` against the method's own (virtual) reference, `acc_logp` of raw log-probs. "
             "Mean ± sd over seeds.", "",
             "| method | K | pairs | acc_primary % | acc_own % | acc_logp % | held-out loss | greedy % | pass@1 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(r, k, nd=1):
        m, s = r.get(k), r.get(k + "_sd")
        if m is None:
            return "-"
        return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s else "")

    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r.get('K', '-')} | {r['pairs']} | {ms(r, 'acc_primary')} | "
                     f"{ms(r, 'acc_own')} | {ms(r, 'acc_logp')} | {ms(r, 'loss', 4)} | {ms(r, 'greedy')} | "
                     f"{ms(r, 'pass@1')} |")
    lines += [""] + res["verdict"]
    return "\n".join(lines) + "\n"


def run_mrpo(cfg: dict) -> dict:
    """DPO vs MRPO at each pair count and seed; writes results.json / results.md under ``out``."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    progress = cfg.get("progress", True)
    policy_dir = ensure_world_model(cfg["sft"], out / "sft", progress=progress)
    refs = _ref_models(cfg, out, policy_dir)
    names = [n for n, _ in refs]
    methods = [Method.from_dict(m, names) for m in cfg["methods"]]
    if len({m.name for m in methods}) != len(methods):
        raise ValueError(f"methods: expected distinct names, got {[m.name for m in methods]}")
    model, _, tok = wexp.load_world_model(policy_dir)
    data = build_mrpo_data(cfg, out, policy_dir, refs, tok)
    held = data["held_out"]
    train_all = prefs.take_pairs({k: v for k, v in data.items() if k not in ("meta", "held_out")},
                                 np.flatnonzero(~held))
    held_data = prefs.take_pairs({k: v for k, v in data.items() if k not in ("meta", "held_out")},
                                 np.flatnonzero(held))
    n_train, n_held = len(train_all["prompt_id"]), len(held_data["prompt_id"])
    if n_train == 0 or n_held == 0:
        raise ValueError(f"pairs: expected training and held-out pairs, got {n_train} and {n_held}")
    counts = sorted({min(int(c), n_train) for c in cfg["pairs"]["counts"]})
    e = cfg["eval"]
    eval_problems = world.make_split(e["split"], int(e["n_problems"]), _world_cfg(cfg), seed=_sft_seed(cfg))
    beta = float(cfg["train"]["beta"])
    writer = JsonlWriter(out / "metrics.jsonl")
    ebs = int(e["pair_batch_size"])
    rows = []
    try:
        pw0, pl0 = _held_out_scores(model, held_data, ebs)
        base = {"method": "initial policy", "kind": "-", "K": "-", "pairs": 0,
                **_pref_metrics(pw0, pl0, held_data, None, None, beta, None),
                **evaluate(model, tok, eval_problems, cfg)}
        base["acc_primary"] = None  # the policy is the primary reference: every implicit reward is 0
        rows.append(base)
        _say(cfg, f"initial policy: {base}")
        runs, step_cache = [], {}
        for n in counts:
            for seed in cfg["train"]["seeds"]:
                sub = prefs.take_pairs(train_all, prefs.subsample_pairs(n_train, n, seed=int(cfg["pairs"]["seed"])))
                for m in methods:
                    ref_index = [names.index(r) for r in m.refs]
                    tag = f"{m.name}/n{n}/s{seed}"
                    t1 = time.time()
                    pol, hist, weights = train_preference(model, sub, m, ref_index, cfg, int(seed), writer, tag,
                                                          step_cache)
                    pw, pl = _held_out_scores(pol, held_data, ebs)
                    rec = {"method": m.name, "kind": m.loss, "K": len(m.refs), "pairs": n, "seed": seed,
                           "train_loss_first": hist[0]["loss"], "train_loss_last": hist[-1]["loss"],
                           **_pref_metrics(pw, pl, held_data, m, ref_index, beta, weights),
                           **evaluate(pol, tok, eval_problems, cfg), "seconds": time.time() - t1}
                    if weights is not None:
                        rec["weights"] = [float(x) for x in weights]
                    runs.append(rec)
                    writer.write(0, {"phase": f"{tag}/eval", **{k: v for k, v in rec.items() if k != "weights"}})
                    _say(cfg, f"{tag}: loss {rec['train_loss_first']:.4f} -> {rec['train_loss_last']:.4f}, "
                              f"acc_primary {rec['acc_primary']:.1f}, pass@1 {rec['pass@1']:.1f}")
        for n in counts:
            for m in methods:
                rs = [r for r in runs if r["method"] == m.name and r["pairs"] == n]
                row = {"method": m.name, "kind": m.loss, "K": len(m.refs), "pairs": n, "seeds": len(rs)}
                for k in ("acc_primary", "acc_own", "acc_logp", "loss", "greedy", "pass@1", "gold_logp"):
                    row[k], row[k + "_sd"] = _mean_sd([r.get(k) for r in rs])
                rows.append(row)
    finally:
        writer.close()
    res = {"policy_model": str(policy_dir), "references": [[n, str(d)] for n, d in refs],
           "n_pairs_train": n_train, "n_pairs_held": n_held, "n_eval": len(eval_problems),
           "eval_split": e["split"], "n_samples": e["n_samples"], "rows": rows, "runs": runs,
           "seconds": time.time() - t0, "config": cfg}
    res["verdict"] = _verdict(rows, n_held, len(eval_problems))
    _write_results(out, res, _mrpo_markdown(res))
    _say(cfg, f"wrote {out / 'results.md'}")
    return res


def mrpo_main(argv) -> int:
    """``swiftjax train-mrpo [CONFIG.yaml] [key=value ...]``."""
    cfg = config_from_argv(argv, MRPO_DEFAULTS)
    run_mrpo(cfg)
    return 0




def main(argv) -> int:
    """``swiftjax preference irft|mrpo CONFIG [k=v ...]``."""
    from swiftjax.config import subcommand

    return subcommand("preference", {"irft": irft_main, "mrpo": mrpo_main}, argv)
