"""SFT vs IRFT vs RFT from a task's demonstrations, on any (Backbone, Task).

    swiftjax preference irft CONFIG [key=value ...]   # -> {out}/results.json, results.md, metrics.jsonl

The initial policy is ``model`` (after the optional SFT stage on the task's training
demonstrations, :mod:`swiftjax.methods.preference.common`).

IRFT (arXiv 2405.17888). The demonstrations (the task's training problems and their
``solution``) are shuffled and split into ``irft.stages`` disjoint chunks. Stage t: freeze a copy
pi_t of the policy (its params as a separate ``nnx.State``); generate y~ for the chunk's prompts
with pi_t (greedy by default); compute pi_t's sequence log-probs of the demonstrations and of y~
once (stored as the pairs' one reference column); train ``irft.epochs`` epochs over the chunk on
:func:`swiftjax.methods.preference.losses.irft_loss` (``r_t = beta*(log pi - log pi_t)``, demo
over generation) with a fresh optimizer (RMSprop, eps outside the sqrt, as the paper; AdamW by
config). Pairs whose generated response equals the demonstration token for token are skipped:
their loss is log 2 with zero gradient for any theta. At the first step of every stage the
policy equals pi_t, so the loss is exactly log 2.

RFT (explicit reward). Round r: freeze pi_r, generate y~ for the round's chunk as above; train a
reward model = a linear value head ``r[b, t] = h[b, t] . w + c`` on pi_r's final (post-norm)
hidden states, frozen (features computed once per round; only D + 1 parameters train), with the
per-token Bradley-Terry loss from the first position where demo and generation differ
(:func:`~swiftjax.methods.preference.losses.bt_token_reward_loss`; ``rft.rm.loss: sequence`` uses
the reward at the last token); then ``rft.pg.steps`` policy-gradient steps: sample responses
from the current policy (temperature ``rft.pg.temperature``), score each by the head at its last
token (on pi_r's states), and train on
:func:`~swiftjax.methods.preference.losses.kl_regularised_pg_loss` against the frozen initial
policy.

Evaluation (every method, after every stage / round when ``eval.each_stage``): on the task's
test split (:func:`swiftjax.methods.preference.common.evaluate`).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from swiftjax.parallel import MeshConfig
from swiftjax import logprobs as lm
from swiftjax.backbone import Backbone
from swiftjax.batching import epoch_batches, map_batches
from swiftjax.config import to_plain
from swiftjax.methods.preference import losses
from swiftjax.methods.preference.common import (EvalSection, GenerationSection, OptimizerSection, SFTSection,
                                                backbone_config, clone, cycle, demonstrations, ensure_sft_policy,
                                                evaluate, fmt, prompt_width, run_steps, sample_rows,
                                                sampling_config, write_results)
from swiftjax.methods.preference.pairs import (PreferencePairs, encode_pairs, pair_batches, pair_logprobs,
                                               pair_sequence_logprobs, through_first_divergence)
from swiftjax.sample import check_writable
from swiftjax.sampling import generate
from swiftjax.tasks import Task, TaskConfig, make_task
from swiftjax.train import loop
from swiftjax.train.metrics import JsonlWriter

__all__ = ["IRFTSection", "RewardModelSection", "PolicyGradientSection", "RFTSection", "IRFTRunConfig",
           "run_irft", "run_irft_stages", "run_rft_rounds", "stage_pairs", "train_reward_head"]


# ============================================================================= config


@dataclasses.dataclass(frozen=True)
class IRFTSection:
    """``stages``: T disjoint chunks of the demonstrations, one per stage. ``temperature``: y~
    from the frozen pi_t (0 = greedy, the reference). ``negatives``: all (the method) |
    incorrect (a diagnostic: drop y~ the grader marks correct). ``contrast``: sequence (the
    method) | first_divergence (score each pair only through the token where they part).
    The optimizer restarts every stage."""

    enabled: bool = True
    stages: int = 4
    beta: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    temperature: float = 0.0
    negatives: Literal["all", "incorrect"] = "all"
    contrast: Literal["sequence", "first_divergence"] = "sequence"
    optimizer: OptimizerSection = OptimizerSection(name="rmsprop", lr=3e-6, schedule="cosine", warmup_ratio=0.1)

    def __post_init__(self):
        if self.stages < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"stages / epochs / batch_size: expected >= 1, got {self.stages} / {self.epochs} / "
                             f"{self.batch_size}")
        if not self.beta > 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class RewardModelSection:
    """The linear value head on the frozen round policy's final hidden states. ``loss``: token
    (per-token BT from the first divergence, the reference) | sequence (the last token)."""

    loss: Literal["token", "sequence"] = "token"
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class PolicyGradientSection:
    """KL-regularised REINFORCE against the frozen initial policy."""

    steps: int = 25
    batch_size: int = 32
    beta: float = 0.05
    baseline: Literal["mean", "loo", "none"] = "loo"
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class RFTSection:
    enabled: bool = True
    rounds: int = 4
    temperature: float = 0.0
    rm: RewardModelSection = RewardModelSection()
    pg: PolicyGradientSection = PolicyGradientSection()
    optimizer: OptimizerSection = OptimizerSection(name="adamw", lr=2e-5)


@dataclasses.dataclass(frozen=True)
class IRFTRunConfig:
    """Every default of ``swiftjax preference irft``; YAML files and ``key=value`` only override.

    model: an HF causal-LM directory, or ``world`` (the shipped world model); template / system
      / dtype: how it is prompted (:class:`swiftjax.backbone.BackboneConfig`).
    task: problems, demonstrations (the train split's solutions) and grading; evaluation runs
      on its test split.
    max_len: the width of demonstration / y~ pairs (null: the longest demonstration or prompt +
      max_new_tokens, rounded up to 16; with a value, longer pairs are skipped).
    """

    model: str = "world"
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"
    task: TaskConfig = TaskConfig()
    out: str = "runs/irft"
    seed: int = 0
    progress: bool = True
    mesh: MeshConfig = MeshConfig()  # the device mesh (swiftjax.parallel); default one device
    generation: GenerationSection = GenerationSection()
    max_len: int | None = None
    sft: SFTSection = SFTSection()
    irft: IRFTSection = IRFTSection()
    rft: RFTSection = RFTSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len: expected an int >= 2 or null, got {self.max_len}")


# ============================================================================= shared


def _chunks(n: int, parts: int, seed: int) -> list[np.ndarray]:
    if parts < 1:
        raise ValueError(f"stages/rounds: expected >= 1, got {parts}")
    size = n // parts
    if size < 1:
        raise ValueError(f"task.n_train={n}: expected at least one demonstration per stage ({parts} stages)")
    order = np.random.default_rng([seed, 17]).permutation(n)
    return [np.sort(order[i * size:(i + 1) * size]) for i in range(parts)]


def pair_width(cfg: IRFTRunConfig, backbone: Backbone, task: Task, demos) -> int:
    """One width for every stage's (demonstration, y~) pairs, so one compilation serves them."""
    if cfg.max_len is not None:
        return cfg.max_len
    msgs = [task.user_message(p) for p in demos]
    longest = max(len(backbone.prompt_ids(m)) + len(backbone.response_ids(m, p.solution)) for m, p in zip(msgs, demos))
    gen = prompt_width(backbone, msgs, cfg.generation) + cfg.generation.max_new_tokens
    return -(-max(longest, gen) // 16) * 16


def stage_pairs(backbone: Backbone, model, task: Task, problems, cfg: IRFTRunConfig, *, temperature: float,
                seed: int, max_len: int, negatives: str = "all", contrast: str = "sequence"):
    """Generate y~ with ``model`` (the frozen stage policy) and encode (demonstration, y~) pairs.

    ``negatives``: ``all`` keeps every y~ that differs from its demonstration (the method);
    ``incorrect`` also drops the y~ the grader marks correct (a diagnostic). ``contrast``:
    ``first_divergence`` cuts both response masks after the first token where they differ.

    Returns (PreferencePairs with chosen = demonstration, rejected = y~ and no reference yet;
    info: counts of prompts, identical (skipped), too long (skipped), correct y~; kept problem
    indices)."""
    rows = sample_rows(backbone, model, task, problems, n=1, gen=cfg.generation, temperature=temperature, seed=seed)
    msgs = [task.user_message(p) for p in problems]
    demo = [backbone.response_ids(m, p.solution) for m, p in zip(msgs, problems)]
    gen = [list(r["token_ids"]) for r in rows]
    same = np.array([d == g for d, g in zip(demo, gen)], bool)
    correct = np.array([bool(r["correct"]) for r in rows], bool)
    pairs, kept_len = encode_pairs(backbone, msgs, demo, gen, max_len, drop_long=True)
    ok = np.zeros(len(problems), bool)
    ok[kept_len] = True
    keep = ok & ~same & (~correct if negatives == "incorrect" else True)
    pairs = pairs.take(np.searchsorted(kept_len, np.flatnonzero(keep)))
    if contrast == "first_divergence" and len(pairs):
        pairs = through_first_divergence(pairs)
    info = {"prompts": len(problems), "skipped_identical": int(same.sum()), "skipped_long": int((~ok).sum()),
            "pairs": int(keep.sum()),
            "skipped_correct": int((ok & ~same & correct).sum()) if negatives == "incorrect" else 0,
            "gen_correct": 100.0 * float(np.mean(correct))}
    return pairs, info, np.flatnonzero(keep)


# ============================================================================= IRFT


def _irft_loss_fn(beta: float):
    def fn(model, batch: PreferencePairs, rng):
        pi_d, pi_g = pair_logprobs(model, batch)
        loss, m = losses.irft_loss(pi_d, pi_g, batch.ref_chosen[:, 0], batch.ref_rejected[:, 0], beta)
        return loss, {k: v for k, v in m.items() if k != "loss"}

    return fn


def run_irft_stages(backbone: Backbone, task: Task, demos, eval_problems, cfg: IRFTRunConfig, writer,
                    log=print) -> tuple[Any, list, list]:
    """IRFT from ``backbone.model`` (not modified); returns (final model, stage records, eval rows)."""
    c = cfg.irft
    graphdef, params, rest = loop.nnx_split(backbone.model)
    params = clone(params)
    chunks = _chunks(len(demos), c.stages, cfg.seed)
    width = pair_width(cfg, backbone, task, demos)
    steps_max = c.epochs * max(len(chunks[0]) // min(c.batch_size, len(chunks[0])), 1)
    opt = c.optimizer.make(steps_max)
    tx = loop.make_optimizer(opt)
    step_fn = loop.make_train_step(loop.nnx_loss(graphdef, _irft_loss_fn(c.beta)), tx,
                                   lr_fn=loop.learning_rate_fn(opt))
    records, evals, gstep = [], [], 0
    for t, idx in enumerate(chunks, 1):
        t0 = time.time()
        frozen_model = loop.nnx_merge(graphdef, clone(params), rest)  # pi_t: a separate, never-trained copy
        probs = [demos[i] for i in idx]
        pairs, info, _ = stage_pairs(backbone, frozen_model, task, probs, cfg, temperature=c.temperature,
                                     seed=cfg.seed * 1000 + t, max_len=width, negatives=c.negatives,
                                     contrast=c.contrast)
        rec = {"stage": t, **info}
        n = info["pairs"]
        if n == 0:
            rec.update(steps=0, note="every generation equals its demonstration: nothing to train")
            records.append(rec)
            continue
        lw, ll = pair_sequence_logprobs(frozen_model, pairs, cfg.eval.batch_size)
        pairs = pairs.with_refs(["pi_t"], lw[:, None], ll[:, None])
        bs = min(c.batch_size, n)
        batches = pair_batches(pairs, bs, cfg.seed * 1000 + t)
        steps = c.epochs * batches.steps_per_epoch
        state = loop.init_state(params, tx, cfg.seed * 1000 + t, frozen=rest)  # the optimizer restarts
        state, hist = run_steps(state, step_fn, cycle(batches), steps, writer, f"irft/stage{t}", cfg.progress, gstep)
        gstep += steps
        params = state.params
        rec.update(steps=steps, batch_size=bs, loss_first=hist[0]["loss"], loss_last=hist[-1]["loss"],
                   accuracy_last=hist[-1]["accuracy"], margin_last=hist[-1]["reward_margin"],
                   seconds=time.time() - t0)
        records.append(rec)
        log(f"IRFT stage {t}: {n} pairs ({info['skipped_identical']} identical skipped), {steps} steps, "
            f"loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}")
        if cfg.eval.each_stage or t == len(chunks):
            ev = evaluate(backbone, loop.nnx_merge(graphdef, params, rest), task, eval_problems, cfg.eval,
                          cfg.generation)
            evals.append({"method": "IRFT", "stage": t, **ev})
            writer.write(gstep, {"phase": f"irft/eval{t}", **ev})
    return loop.nnx_merge(graphdef, clone(params), rest), records, evals


# ============================================================================= RFT


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _final_hidden(graphdef, state, ids, attn):
    model = nnx.merge(graphdef, state)
    return model(ids, attn, output_hidden_states=True, compute_logits=False).hidden_states[-1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_lp(graphdef, state, ids, attn, resp):
    return lm.response_token_logprobs(nnx.merge(graphdef, state), ids, attn, resp)[0]


def _head_rewards(head, h):
    return jnp.einsum("btd,d->bt", h, head["w"]) + head["b"]


def _last_index(mask):
    """Index of the last nonzero entry of each row of a [B, T] mask (right or left padding)."""
    T = mask.shape[1]
    return T - 1 - jnp.argmax(mask[:, ::-1] != 0, axis=1)


def _rm_loss_fn(kind: str):
    def fn(head, batch, rng):
        p: PreferencePairs = batch["pairs"]
        r_d = _head_rewards(head, batch["h_chosen"])
        r_g = _head_rewards(head, batch["h_rejected"])
        if kind == "token":
            loss, m = losses.bt_token_reward_loss(r_d, r_g, p.chosen_ids, p.rejected_ids, p.chosen_attention_mask,
                                                  p.rejected_attention_mask)
        else:
            sd = jnp.take_along_axis(r_d, _last_index(p.chosen_attention_mask)[:, None], 1)[:, 0]
            sg = jnp.take_along_axis(r_g, _last_index(p.rejected_attention_mask)[:, None], 1)[:, 0]
            loss, m = losses.bt_reward_loss(sd, sg)
        return loss, {"accuracy": m["accuracy"]}

    return fn


def train_reward_head(feature_model, pairs: PreferencePairs, cfg: IRFTRunConfig, writer, tag: str, seed: int):
    """Fit a linear value head on the frozen model's final hidden states of demo and y~.

    Returns (head {w [D], b []}, history)."""
    r = cfg.rft.rm
    # crop the all-padding tail shared by every row
    L = int(max(np.asarray(pairs.chosen_attention_mask).sum(1).max(),
                np.asarray(pairs.rejected_attention_mask).sum(1).max()))
    arrays = {k: np.asarray(v)[:, :L] for k, v in pairs.arrays().items() if k.startswith(("chosen_", "rejected_"))}
    gd, st = nnx.split(feature_model)
    for side in ("chosen", "rejected"):
        (arrays[f"h_{side}"],) = map_batches(lambda i, a: _final_hidden(gd, st, i, a),
                                             (arrays[f"{side}_ids"], arrays[f"{side}_attention_mask"]),
                                             cfg.eval.batch_size)
    D = arrays["h_chosen"].shape[-1]
    head = {"w": jnp.zeros((D,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    tx = loop.make_optimizer(loop.OptimizerConfig(name="adamw", lr=r.lr, weight_decay=r.weight_decay))
    step_fn = loop.make_train_step(_rm_loss_fn(r.loss), tx)
    n = len(pairs)
    inner = epoch_batches(arrays, min(r.batch_size, n), seed)

    def batches(epoch):
        for b in inner(epoch):
            no_refs = jnp.zeros((len(b["h_chosen"]), 0), jnp.float32)
            p = PreferencePairs(**{k: b[k] for k in b if k.startswith(("chosen_", "rejected_"))},
                                ref_chosen=no_refs, ref_rejected=no_refs)
            yield {"pairs": p, "h_chosen": b["h_chosen"], "h_rejected": b["h_rejected"]}

    state = loop.init_state(head, tx, seed)
    state, hist = run_steps(state, step_fn, cycle(batches), r.steps, writer, tag, cfg.progress)
    return state.params, hist


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rm_score(graphdef, state, head, ids, attn):
    model = nnx.merge(graphdef, state)
    h = model(ids, attn, output_hidden_states=True, compute_logits=False).hidden_states[-1]
    return jnp.take_along_axis(_head_rewards(head, h), _last_index(attn)[:, None], 1)[:, 0]


def _pg_loss_fn(beta: float, baseline: str):
    def fn(model, batch, rng):
        lp, m = lm.response_token_logprobs(model, batch["ids"], batch["attention_mask"], batch["response_mask"])
        loss, met = losses.kl_regularised_pg_loss(lp, batch["ref_lp"], batch["reward"], m, beta, baseline)
        return loss, {k: v for k, v in met.items() if k != "loss"}

    return fn


def run_rft_rounds(backbone: Backbone, task: Task, demos, eval_problems, cfg: IRFTRunConfig, writer,
                   log=print) -> tuple[Any, list, list]:
    """RFT from ``backbone.model`` (the initial policy, also the KL reference); returns
    (final model, round records, eval rows)."""
    c, pg, g = cfg.rft, cfg.rft.pg, cfg.generation
    graphdef, params, rest = loop.nnx_split(backbone.model)
    ref_gd, ref_state = nnx.split(loop.nnx_merge(graphdef, clone(params), rest))  # frozen initial policy
    params = clone(params)
    chunks = _chunks(len(demos), c.rounds, cfg.seed + 1)
    width = pair_width(cfg, backbone, task, demos)
    opt = c.optimizer.make(pg.steps)
    tx = loop.make_optimizer(opt)
    step_fn = loop.make_train_step(loop.nnx_loss(graphdef, _pg_loss_fn(pg.beta, pg.baseline)), tx)
    scfg = sampling_config(backbone, g, pg.temperature)
    B, N = pg.batch_size, g.max_new_tokens
    key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
    records, evals, gstep = [], [], 0
    for r, idx in enumerate(chunks, 1):
        t0 = time.time()
        frozen_model = loop.nnx_merge(graphdef, clone(params), rest)
        probs = [demos[i] for i in idx]
        pairs, info, _ = stage_pairs(backbone, frozen_model, task, probs, cfg, temperature=c.temperature,
                                     seed=cfg.seed * 1000 + 500 + r, max_len=width)
        rec = {"round": r, **info}
        if info["pairs"] == 0:
            rec.update(note="every generation equals its demonstration: no reward-model data")
            records.append(rec)
            continue
        head, rm_hist = train_reward_head(frozen_model, pairs, cfg, writer, f"rft/rm{r}", cfg.seed * 1000 + r)
        rec.update(rm_loss_first=rm_hist[0]["loss"], rm_loss_last=rm_hist[-1]["loss"],
                   rm_accuracy_last=rm_hist[-1]["accuracy"])
        fgd, fstate = nnx.split(frozen_model)
        msgs = [task.user_message(p) for p in probs]
        pids, pmask = backbone.encode_prompts(msgs, prompt_width(backbone, msgs, g))
        order = np.random.default_rng([cfg.seed, r, 3]).permutation(len(msgs))
        state = loop.init_state(params, tx, cfg.seed * 1000 + r, frozen=rest)  # the optimizer restarts
        hist = []
        bar = tqdm(total=pg.steps, desc=f"rft/pg{r}", disable=not cfg.progress, leave=False)
        for k in range(pg.steps):
            sel = order[np.arange(k * B, (k + 1) * B) % len(msgs)]
            key, sub = jax.random.split(key)
            out = generate(loop.nnx_merge(graphdef, state.params, rest), pids[sel], pmask[sel], key=sub, cfg=scfg)
            valid = (np.arange(N)[None, :] < np.asarray(out.lengths)[:, None]).astype(np.int32)
            ids = jnp.asarray(np.concatenate([pids[sel], np.asarray(out.tokens)], 1))
            attn = jnp.asarray(np.concatenate([pmask[sel], valid], 1))
            resp = jnp.asarray(np.concatenate([np.zeros_like(pmask[sel]), valid], 1))
            batch = {"ids": ids, "attention_mask": attn, "response_mask": resp,
                     "ref_lp": _token_lp(ref_gd, ref_state, ids, attn, resp),
                     "reward": _rm_score(fgd, fstate, head, ids, attn)}
            state, m = step_fn(state, batch)
            h = {k2: float(v) for k2, v in jax.device_get(dict(m)).items()}
            hist.append(h)
            writer.write(gstep + k + 1, {"phase": f"rft/pg{r}", **h})
            bar.update(1)
        bar.close()
        gstep += pg.steps
        params = state.params
        if hist:
            rec.update(pg_steps=len(hist), pg_loss_last=hist[-1]["loss"], reward_first=hist[0]["reward"],
                       reward_last=hist[-1]["reward"], kl_last=hist[-1]["kl"])
        rec["seconds"] = time.time() - t0
        records.append(rec)
        log(f"RFT round {r}: RM loss {rec['rm_loss_first']:.4f} -> {rec['rm_loss_last']:.4f}, "
            f"reward {rec.get('reward_first', float('nan')):.3f} -> {rec.get('reward_last', float('nan')):.3f}")
        if cfg.eval.each_stage or r == len(chunks):
            ev = evaluate(backbone, loop.nnx_merge(graphdef, params, rest), task, eval_problems, cfg.eval, g)
            evals.append({"method": "RFT", "stage": r, **ev})
            writer.write(gstep, {"phase": f"rft/eval{r}", **ev})
    return loop.nnx_merge(graphdef, clone(params), rest), records, evals


# ============================================================================= the run


def _markdown(res: Mapping) -> str:
    lines = [f"# SFT vs IRFT vs RFT: {res['task']['name']} on `{res['model']['path']}`", "",
             f"Initial policy: `{res['policy']['path']}` (digest {res['policy']['digest'][:12]}); "
             f"{res['n_demos']} demonstrations; evaluation on {res['n_eval']} test problems (pass@1 over "
             f"{res['n_samples']} samples at T={res['eval_temperature']}).", "",
             "| method | stage | greedy % | pass@1 % | gold log-prob / token |",
             "|---|---:|---:|---:|---:|"]
    for row in res["evals"]:
        lines.append(f"| {row['method']} | {row['stage']} | {fmt(row['greedy'])} | {fmt(row['pass@1'])} | "
                     f"{fmt(row['gold_logp'], 4)} |")
    if res.get("irft_stages"):
        ic = res["config"]["irft"]
        what = "generations identical to the demonstration" + (
            " and those graded correct (diagnostic: negatives = incorrect)" if ic["negatives"] == "incorrect" else "")
        if ic["contrast"] == "first_divergence":
            what += "; each pair scored only through the first token where demonstration and y~ differ"
        lines += ["", f"IRFT stages (pairs = prompts minus {what}):", "",
                  "| stage | pairs | identical | correct dropped | y~ correct % | steps | loss first | loss last | acc last |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["irft_stages"]:
            lines.append(f"| {s['stage']} | {s['pairs']} | {s['skipped_identical']} | {s.get('skipped_correct', 0)} | "
                         f"{fmt(s['gen_correct'])} | {s.get('steps', 0)} | {fmt(s.get('loss_first'), 4)} | "
                         f"{fmt(s.get('loss_last'), 4)} | {fmt(s.get('accuracy_last'), 3)} |")
    if res.get("rft_rounds"):
        lines += ["", "RFT rounds:", "",
                  "| round | pairs | RM loss first | RM loss last | RM acc | reward first | reward last | KL last |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["rft_rounds"]:
            lines.append(f"| {s['round']} | {s['pairs']} | {fmt(s.get('rm_loss_first'), 4)} | "
                         f"{fmt(s.get('rm_loss_last'), 4)} | {fmt(s.get('rm_accuracy_last'), 3)} | "
                         f"{fmt(s.get('reward_first'), 3)} | {fmt(s.get('reward_last'), 3)} | "
                         f"{fmt(s.get('kl_last'), 3)} |")
    return "\n".join(lines) + "\n"


def run_irft(cfg: IRFTRunConfig, *, log=print) -> dict:
    """(SFT ->) IRFT (T stages) and RFT; writes results.json / results.md under ``out``."""
    out = check_writable(Path(cfg.out), "out")
    t0 = time.time()
    task = make_task(cfg.task)
    demos = demonstrations(task, "train")
    eval_problems = task.problems("test")
    writer = JsonlWriter(out / "metrics.jsonl")
    try:
        base, policy, sft_info = ensure_sft_policy(backbone_config(cfg), task, cfg.sft, out, seed=cfg.seed,
                                                   writer=writer, progress=cfg.progress, log=log)
        evals = [{"method": "SFT" if sft_info else "initial", "stage": 0,
                  **evaluate(policy, policy.model, task, eval_problems, cfg.eval, cfg.generation)}]
        log(f"{evals[0]['method']}: {evals[0]}")
        res: dict = {"model": base.describe(), "policy": policy.describe(), "sft": sft_info,
                     "task": task.describe(), "n_demos": len(demos), "n_eval": len(eval_problems),
                     "n_samples": cfg.eval.n_samples, "eval_temperature": cfg.eval.temperature,
                     "config": to_plain(cfg)}
        if cfg.irft.enabled:
            _, stages, ev = run_irft_stages(policy, task, demos, eval_problems, cfg, writer, log)
            evals += ev
            res["irft_stages"] = stages
        if cfg.rft.enabled:
            _, rounds, ev = run_rft_rounds(policy, task, demos, eval_problems, cfg, writer, log)
            evals += ev
            res["rft_rounds"] = rounds
    finally:
        writer.close()
    res["evals"] = evals
    res["seconds"] = time.time() - t0
    write_results(out, res, _markdown(res))
    log(f"wrote {out / 'results.md'}")
    return res
