"""DPO vs MRPO from preference pairs against one or several reference models, on any
(Backbone, Task).

    swiftjax preference mrpo CONFIG [key=value ...]   # -> {out}/results.json, results.md, pairs.npz

MRPO (arXiv 2405.16388). The initial policy is ``model`` (after the optional SFT stage on the
task's training demonstrations, :mod:`swiftjax.methods.preference.common`); it is also the
primary reference, named ``init``.

Candidates: ``candidates.path`` (a candidate jsonl, :mod:`swiftjax.data.candidates`: its texts
are used) or, if null, ``candidates.n`` samples per training problem of the task from the
initial policy (:func:`swiftjax.sample.candidate_set`: resumable, keyed by everything; the
policy side then uses the sampled token ids as they are). Pairs: (correct, incorrect) of one
prompt, at most ``pairs.max_per_prompt`` per prompt, split by prompt into train / held-out
(:mod:`swiftjax.methods.preference.pairs`). References: index 0 = ``init``, then
``references`` (each another model directory, a Backbone with its own tokenizer and template:
it scores the pair texts on its own tokenisation). Every reference's sequence log-prob of every
pair side is computed once and stored in ``{out}/pairs.npz`` (reused, reference by reference,
while the policy, the candidates, the pair settings and that reference's digest are unchanged).

Each method in ``methods`` (``loss: dpo`` with one reference, or ``loss: mrpo`` with a list of
reference names and weighting ``arwc`` (``convention: paper|code``) / ``uniform`` /
``validation`` (fixed weights from :func:`~swiftjax.methods.preference.losses.validation_weights`
over the *training* pairs: no per-example labels) and CTRO ``eps``) trains a copy of the initial
policy for ``train.steps`` at every pair count of ``pairs.counts`` and every seed of
``train.seeds``. Reported: held-out preference accuracy against the common primary reference
(``acc_primary``: ``beta*(lp - lp_init)`` of chosen above rejected), against the method's own
(virtual) reference (``acc_own``; ARWC's own reference uses the held-out labels for its
weights, as the method does), and of raw log-probs (``acc_logp``); held-out loss; greedy
accuracy, pass@1 and the reference solutions' log-prob on the task's test problems.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Literal, Mapping

import jax.numpy as jnp
import numpy as np

from swiftjax.parallel import MeshConfig
from swiftjax._io import file_sha256
from swiftjax.backbone import Backbone, BackboneConfig, load_backbone
from swiftjax.config import to_plain
from swiftjax.data import candidates as cands
from swiftjax.methods.preference import losses
from swiftjax.methods.preference.common import (PRIMARY, EvalSection, GenerationSection, OptimizerSection,
                                                SFTSection, backbone_config, clone, cycle, ensure_sft_policy,
                                                evaluate, run_steps, write_results)
from swiftjax.methods.preference.pairs import (PAIR_KEYS, PreferencePairs, encode_pairs, load_pairs, make_pairs,
                                               pair_batches, pair_logprobs, pair_sequence_logprobs,
                                               reference_logprobs, save_pairs, split_by_prompt, subsample_pairs)
from swiftjax.sample import SamplingSection, candidate_set, check_writable
from swiftjax.tasks import Task, TaskConfig, make_task
from swiftjax.train import loop
from swiftjax.train.metrics import JsonlWriter, to_python

__all__ = ["ReferenceSection", "MethodSection", "CandidatesSection", "PairsSection", "PreferenceTrainSection",
           "MRPORunConfig", "run_mrpo", "build_pair_data", "train_preference", "pref_metrics", "weights_for"]


# ============================================================================= config


@dataclasses.dataclass(frozen=True)
class ReferenceSection:
    """An extra reference: a name (methods cite it) and a model directory with how to prompt it."""

    name: str = ""
    model: str = ""
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if not self.name or self.name == PRIMARY:
            raise ValueError(f"name: expected a name other than {PRIMARY!r} (the initial policy), got {self.name!r}")
        if not self.model:
            raise ValueError(f"reference {self.name!r}: model: expected a model directory (or world)")

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(path=self.model, template=self.template, system=self.system, dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class MethodSection:
    """One preference method: ``loss`` dpo (refs = [init]) or mrpo (refs: names, ``init`` first);
    ``weighting`` arwc | uniform | validation; ``convention`` (ARWC); ``eps`` (CTRO; null: off);
    ``virtual`` harmonic | geometric."""

    name: str = "dpo"
    loss: Literal["dpo", "mrpo"] = "dpo"
    refs: tuple[str, ...] = (PRIMARY,)
    weighting: Literal["arwc", "uniform", "validation"] = "arwc"
    convention: Literal["paper", "code"] = "paper"
    eps: float | None = 0.1
    virtual: Literal["harmonic", "geometric"] = "harmonic"

    def __post_init__(self):
        if not self.refs or self.refs[0] != PRIMARY:
            raise ValueError(f"method {self.name!r}: refs must start with the primary reference {PRIMARY!r}, "
                             f"got {list(self.refs)}")
        if self.loss == "dpo" and len(self.refs) != 1:
            raise ValueError(f"method {self.name!r}: dpo takes exactly one reference, got {list(self.refs)}")
        if len(set(self.refs)) != len(self.refs):
            raise ValueError(f"method {self.name!r}: expected distinct references, got {list(self.refs)}")


@dataclasses.dataclass(frozen=True)
class CandidatesSection:
    """Where the pairs come from: ``path`` (a candidate jsonl) or null = ``n`` samples per training
    problem from the initial policy at ``temperature`` (seed ``seed``)."""

    path: str | None = None
    n: int = 8
    temperature: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PairsSection:
    """``held_out``: the fraction of prompts held out (no prompt in both parts). ``max_len``: the
    policy-side width (null: the longest pair, rounded up to 16; with a value longer pairs are
    dropped). ``counts``: training pairs per run (capped at what exists)."""

    max_per_prompt: int = 4
    held_out: float = 0.2
    max_len: int | None = None
    counts: tuple[int, ...] = (128, 2048)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"held_out: expected a fraction in (0, 1), got {self.held_out}")
        if not self.counts or min(self.counts) < 1:
            raise ValueError(f"counts: expected positive pair counts, got {list(self.counts)}")


@dataclasses.dataclass(frozen=True)
class PreferenceTrainSection:
    """The same for every method. ``seeds``: data-order seeds (results are mean ± sd over them)."""

    steps: int = 200
    batch_size: int = 16
    beta: float = 0.1
    seeds: tuple[int, ...] = (0,)
    optimizer: OptimizerSection = OptimizerSection(name="adamw", lr=1e-5, schedule="cosine")

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.seeds:
            raise ValueError(f"steps / batch_size / seeds: expected >= 1 / >= 1 / a seed, got {self.steps} / "
                             f"{self.batch_size} / {list(self.seeds)}")
        if not self.beta > 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class MRPORunConfig:
    """Every default of ``swiftjax preference mrpo``; YAML files and ``key=value`` only override.

    model / template / system / dtype: the initial policy (:class:`swiftjax.backbone.BackboneConfig`);
    task: its training problems give the candidates (and SFT demonstrations), its test problems
    the evaluation; references: the extra reference models; methods: what is compared.
    """

    model: str = "world"
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"
    task: TaskConfig = TaskConfig()
    out: str = "runs/mrpo"
    seed: int = 0
    progress: bool = True
    mesh: MeshConfig = MeshConfig()  # the device mesh (swiftjax.parallel); default one device
    generation: GenerationSection = GenerationSection()
    sft: SFTSection = SFTSection()
    candidates: CandidatesSection = CandidatesSection()
    pairs: PairsSection = PairsSection()
    references: tuple[ReferenceSection, ...] = ()
    methods: tuple[MethodSection, ...] = (MethodSection(),)
    train: PreferenceTrainSection = PreferenceTrainSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        names = [PRIMARY] + [r.name for r in self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"references: expected distinct names (not {PRIMARY!r}), got {names[1:]}")
        if not self.methods:
            raise ValueError("methods: expected at least one method")
        if len({m.name for m in self.methods}) != len(self.methods):
            raise ValueError(f"methods: expected distinct names, got {[m.name for m in self.methods]}")
        for m in self.methods:
            unknown = [r for r in m.refs if r not in names]
            if unknown:
                raise ValueError(f"method {m.name!r}: unknown references {unknown}; known: {names}")


# ============================================================================= pairs


def _candidates(cfg: MRPORunConfig, policy: Backbone, task: Task, out: Path, log):
    """(rows, source description, whether the rows' token ids are the policy's own samples)."""
    c, g = cfg.candidates, cfg.generation
    if c.path:
        path = Path(c.path)
        return cands.read_candidates(path), {"path": str(path), "sha256": file_sha256(path)}, False
    sampling = SamplingSection(temperature=c.temperature, top_p=g.top_p, top_k=g.top_k,
                               max_new_tokens=g.max_new_tokens, prompt_len=g.prompt_len, batch_size=g.batch_size)
    rows, path = candidate_set(policy, task, "train", n=c.n, sampling=sampling, seed=c.seed, out_dir=out,
                               progress=cfg.progress, log=log)
    return rows, {"candidate_set": path.name}, True


def build_pair_data(cfg: MRPORunConfig, out: Path, policy: Backbone, task: Task, *, log=print):
    """Candidates -> pair records -> PreferencePairs for ``policy`` with every reference's
    log-probs (index 0 ``init`` = the policy), stored in ``{out}/pairs.npz``.

    Returns (pairs, held-out flags [N] bool, reference descriptions)."""
    rows, source, own_ids = _candidates(cfg, policy, task, out, log)
    meta = json.dumps(to_python({"policy": policy.digest, "candidates": source,
                                 "pairs": {k: v for k, v in to_plain(cfg.pairs).items() if k != "counts"}}),
                      sort_keys=True)
    store = out / "pairs.npz"
    old, old_extra = (None, {})
    if store.is_file():
        try:
            old, old_extra = load_pairs(store)
        except ValueError:
            old = None
        if old is not None and str(old_extra.get("meta", "")) != meta:
            old = None
    if old is not None:
        recs = {k: old_extra[f"record_{k}"] for k in PAIR_KEYS}
        records = [{k: recs[k][i].item() for k in PAIR_KEYS} for i in range(len(old))]
        pairs = old.select_refs([])
        held = old_extra["held_out"].astype(bool)
    else:
        records = make_pairs(rows, cfg.pairs.max_per_prompt, seed=cfg.pairs.seed)
        if not records:
            raise ValueError(f"candidates ({source}): no prompt has both a correct and an incorrect candidate")
        by_key = {(r["prompt_id"], r["index"]): r for r in rows}
        prompts = [p["prompt"] for p in records]
        if own_ids:
            chosen = [by_key[(p["prompt_id"], p["chosen_index"])]["token_ids"] for p in records]
            rejected = [by_key[(p["prompt_id"], p["rejected_index"])]["token_ids"] for p in records]
        else:
            chosen, rejected = [p["chosen"] for p in records], [p["rejected"] for p in records]
        pairs, kept = encode_pairs(policy, prompts, chosen, rejected, cfg.pairs.max_len, drop_long=True)
        if len(kept) < len(records):
            log(f"pairs: dropped {len(records) - len(kept)} longer than pairs.max_len={cfg.pairs.max_len}")
        records = [records[i] for i in kept]
        _, held_records = split_by_prompt(records, cfg.pairs.held_out, seed=cfg.pairs.seed)
        held_ids = {p["prompt_id"] for p in held_records}
        held = np.array([p["prompt_id"] in held_ids for p in records], bool)
    prompts = [p["prompt"] for p in records]
    texts = ([p["chosen"] for p in records], [p["rejected"] for p in records])
    old_digests = dict(zip(old.ref_names, old_extra["ref_digests"].tolist())) if old is not None else {}
    described = []
    specs = [(PRIMARY, None)] + [(r.name, r) for r in cfg.references]
    lw_all, ll_all = [], []
    for k, (name, spec) in enumerate(specs):
        ref = policy if spec is None else load_backbone(spec.backbone_config())
        described.append({"name": name, **ref.describe()})
        if old_digests.get(name) == ref.digest:
            j = old.ref_names.index(name)
            lw, ll = np.asarray(old.ref_chosen)[:, j], np.asarray(old.ref_rejected)[:, j]
        else:
            lw, ll = reference_logprobs(ref, policy, pairs, prompts, *texts, batch_size=cfg.eval.batch_size)
            log(f"reference {name}: log-probs of {len(pairs)} pairs")
        lw_all.append(lw)
        ll_all.append(ll)
        del ref
    pairs = pairs.with_refs([n for n, _ in specs], np.stack(lw_all, 1), np.stack(ll_all, 1))
    extra = {f"record_{k}": np.array([p[k] for p in records]) for k in PAIR_KEYS}
    extra.update(held_out=held, meta=np.array(meta), ref_digests=np.array([d["digest"] for d in described]))
    save_pairs(store, pairs, extra)
    return pairs, held, described


# ============================================================================= training


def _pref_loss(method: MethodSection, beta: float, weights):
    """loss(pi_w, pi_l, ref_w [K, B], ref_l [K, B]) -> (loss, metrics) for ``method``."""
    if method.loss == "dpo":
        def fn(pi_w, pi_l, ref_w, ref_l):
            return losses.dpo_loss(pi_w, pi_l, ref_w[0], ref_l[0], beta)
        return fn
    weighting = "fixed" if method.weighting == "validation" else method.weighting
    w = None if weights is None else jnp.asarray(weights, jnp.float32)

    def fn(pi_w, pi_l, ref_w, ref_l):
        return losses.mrpo_loss(pi_w, pi_l, ref_w, ref_l, beta, method.eps, weighting=weighting,
                                convention=method.convention, virtual=method.virtual, weights=w)
    return fn


def _pair_train_fn(method: MethodSection, beta: float, weights):
    loss = _pref_loss(method, beta, weights)

    def fn(model, batch: PreferencePairs, rng):
        pi_w, pi_l = pair_logprobs(model, batch)
        lval, m = loss(pi_w, pi_l, batch.ref_chosen.T, batch.ref_rejected.T)
        return lval, {k: v for k, v in m.items() if k in ("accuracy", "reward_margin", "accuracy_primary")}

    return fn


def weights_for(method: MethodSection, pairs: PreferencePairs):
    """Fixed MRPO weights from the training pairs (``weighting: validation``), else None.
    ``pairs`` carries exactly the method's references."""
    if method.loss == "mrpo" and method.weighting == "validation":
        return np.asarray(losses.validation_weights(jnp.asarray(np.asarray(pairs.ref_chosen).T),
                                                    jnp.asarray(np.asarray(pairs.ref_rejected).T)))
    return None


def train_preference(model, pairs: PreferencePairs, method: MethodSection, cfg: MRPORunConfig, seed: int, writer,
                     tag: str, step_cache: dict | None = None):
    """Train a copy of ``model`` on ``pairs`` (whose reference columns are the method's, in its
    order) for ``train.steps``; returns (trained model, history, weights used or None).

    ``step_cache``: a dict reused across calls, so runs of the same method (other pair counts or
    seeds) reuse one compiled train step (the optimizer state is fresh every call)."""
    tc = cfg.train
    graphdef, params, rest = loop.nnx_split(model)
    weights = weights_for(method, pairs)
    opt = tc.optimizer.make(tc.steps)
    key = (graphdef, method, tc.beta, None if weights is None else tuple(np.round(weights, 7).tolist()), opt)
    cache = {} if step_cache is None else step_cache
    if key not in cache:
        tx = loop.make_optimizer(opt)
        cache[key] = (tx, loop.make_train_step(loop.nnx_loss(graphdef, _pair_train_fn(method, tc.beta, weights)), tx))
    tx, step_fn = cache[key]
    batches = pair_batches(pairs, min(tc.batch_size, len(pairs)), seed)
    state = loop.init_state(clone(params), tx, seed, frozen=rest)
    state, hist = run_steps(state, step_fn, cycle(batches), tc.steps, writer, tag, cfg.progress)
    return loop.nnx_merge(graphdef, state.params, rest), hist, weights


def pref_metrics(pi_w, pi_l, pairs: PreferencePairs, method: MethodSection | None, beta: float, weights):
    """Held-out preference metrics of policy log-probs [N]; ``pairs``' reference column 0 is the
    primary one and, with a method, its columns are the method's references."""
    rw, rl = np.asarray(pairs.ref_chosen).T, np.asarray(pairs.ref_rejected).T  # [K, N]
    out = {"acc_primary": 100.0 * float(np.mean((pi_w - rw[0]) > (pi_l - rl[0]))),
           "acc_logp": 100.0 * float(np.mean(pi_w > pi_l))}
    if method is not None:
        loss, m = _pref_loss(method, beta, weights)(jnp.asarray(pi_w), jnp.asarray(pi_l), jnp.asarray(rw),
                                                     jnp.asarray(rl))
        out["acc_own"] = 100.0 * float(m["accuracy"])
        out["loss"] = float(loss)
    return out


# ============================================================================= report


def _mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def _se_pct(p_pct: float, n: int) -> float:
    p = p_pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def verdict(rows, n_held: int, n_eval: int) -> list[str]:
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


def _markdown(res: Mapping) -> str:
    lines = [f"# DPO vs MRPO: {res['task']['name']} on `{res['model']['path']}`", "",
             f"Policy init (primary reference `init`): `{res['policy']['path']}` "
             f"(digest {res['policy']['digest'][:12]}). References: "
             + ", ".join(f"`{r['name']}` ({r['path']})" for r in res["references"]) + ".",
             f"Pairs: {res['n_pairs_train']} training / {res['n_pairs_held']} held-out (split by prompt); "
             f"evaluation on {res['n_eval']} test problems (pass@1 over {res['n_samples']} samples).",
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


# ============================================================================= the run


def run_mrpo(cfg: MRPORunConfig, *, log=print) -> dict:
    """DPO vs MRPO at each pair count and seed; writes results.json / results.md under ``out``."""
    out = check_writable(Path(cfg.out), "out")
    t0 = time.time()
    task = make_task(cfg.task)
    eval_problems = task.problems("test")
    names = [PRIMARY] + [r.name for r in cfg.references]
    writer = JsonlWriter(out / "metrics.jsonl")
    rows, runs = [], []
    try:
        base, policy, sft_info = ensure_sft_policy(backbone_config(cfg), task, cfg.sft, out, seed=cfg.seed,
                                                   writer=writer, progress=cfg.progress, log=log)
        pairs, held, refs = build_pair_data(cfg, out, policy, task, log=log)
        train_all, held_pairs = pairs.take(np.flatnonzero(~held)), pairs.take(np.flatnonzero(held))
        n_train, n_held = len(train_all), len(held_pairs)
        if n_train == 0 or n_held == 0:
            raise ValueError(f"pairs: expected training and held-out pairs, got {n_train} and {n_held}")
        counts = sorted({min(int(c), n_train) for c in cfg.pairs.counts})
        beta, ebs = cfg.train.beta, cfg.eval.batch_size
        model = policy.model
        pw0, pl0 = pair_sequence_logprobs(model, held_pairs, ebs)
        initial = {"method": "initial policy", "kind": "-", "K": "-", "pairs": 0,
                   **pref_metrics(pw0, pl0, held_pairs, None, beta, None),
                   **evaluate(policy, model, task, eval_problems, cfg.eval, cfg.generation)}
        initial["acc_primary"] = None  # the policy is the primary reference: every implicit reward is 0
        rows.append(initial)
        log(f"initial policy: {initial}")
        step_cache: dict = {}
        for n in counts:
            for seed in cfg.train.seeds:
                sub = train_all.take(subsample_pairs(n_train, n, seed=cfg.pairs.seed))
                for m in cfg.methods:
                    ref_index = [names.index(r) for r in m.refs]
                    tag = f"{m.name}/n{n}/s{seed}"
                    t1 = time.time()
                    pol, hist, weights = train_preference(model, sub.select_refs(ref_index), m, cfg, seed, writer,
                                                          tag, step_cache)
                    pw, pl = pair_sequence_logprobs(pol, held_pairs, ebs)
                    rec = {"method": m.name, "kind": m.loss, "K": len(m.refs), "pairs": n, "seed": seed,
                           "train_loss_first": hist[0]["loss"], "train_loss_last": hist[-1]["loss"],
                           **pref_metrics(pw, pl, held_pairs.select_refs(ref_index), m, beta, weights),
                           **evaluate(policy, pol, task, eval_problems, cfg.eval, cfg.generation),
                           "seconds": time.time() - t1}
                    if weights is not None:
                        rec["weights"] = [float(x) for x in weights]
                    runs.append(rec)
                    writer.write(0, {"phase": f"{tag}/eval", **{k: v for k, v in rec.items() if k != "weights"}})
                    log(f"{tag}: loss {rec['train_loss_first']:.4f} -> {rec['train_loss_last']:.4f}, "
                        f"acc_primary {rec['acc_primary']:.1f}, greedy {rec['greedy']:.1f}")
        for n in counts:
            for m in cfg.methods:
                rs = [r for r in runs if r["method"] == m.name and r["pairs"] == n]
                row = {"method": m.name, "kind": m.loss, "K": len(m.refs), "pairs": n, "seeds": len(rs)}
                for k in ("acc_primary", "acc_own", "acc_logp", "loss", "greedy", "pass@1", "gold_logp"):
                    row[k], row[k + "_sd"] = _mean_sd([r.get(k) for r in rs])
                rows.append(row)
    finally:
        writer.close()
    res = {"model": base.describe(), "policy": policy.describe(), "sft": sft_info, "references": refs,
           "task": task.describe(), "n_pairs_train": n_train, "n_pairs_held": n_held, "n_eval": len(eval_problems),
           "n_samples": cfg.eval.n_samples, "rows": rows, "runs": runs, "seconds": time.time() - t0,
           "config": to_plain(cfg)}
    res["verdict"] = verdict(rows, n_held, len(eval_problems))
    write_results(out, res, _markdown(res))
    log(f"wrote {out / 'results.md'}")
    return res
