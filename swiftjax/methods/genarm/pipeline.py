"""GenARM in the embedded world: train autoregressive reward models, then guide the world model.

    swiftjax train-arm [configs/genarm.yaml] [key=value ...]   # pairs -> ARMs (HF dirs under out/)
    swiftjax guide     [configs/genarm.yaml] [key=value ...]   # guided decoding tables

Training (:func:`train_main`):

* Preference pairs come from a candidate jsonl over TRAINING problems (``candidates.path``,
  or sampled from the world model when null): **correct** pairs (a correct vs an incorrect
  sampled solution of the same problem) and **brevity** pairs (a shorter vs a longer
  solution, at least ``pairs.min_len_gap`` tokens apart; both correct with
  ``pairs.brevity_from: correct``, any two candidates with ``all``, the default: in the
  world, correct solutions of one problem almost always have the same length).
* Each ARM starts from the world model (full fine-tune by default, ``train.lora=true`` for
  LoRA adapters merged at the end) and is trained with :func:`swiftjax.methods.genarm.arm.arm_loss` on the
  float32 sums of its response-token log-probs (EOS/<|end|> included, prompt masked).
* The **weak** ARM has half the base's depth: the base's first L/2 blocks (``weak.init:
  truncate``) or a random model (``scratch``), briefly fine-tuned on world SFT data
  (``weak.sft_steps``), then trained on the correct pairs.
* ``pairs.val_frac`` of the training problems (all their pairs) are held out; the ARM's
  preference accuracy on them is reported after training.
* ARMs are saved as HF directories ``{out}/arm_{name}`` with the world tokenizer.

Guidance (:func:`guide_main`) samples ``guide.n`` solutions per held-out TEST problem at the
same temperature for every method and the same PRNG keys (common random numbers) and reports
pass@1 (mean correctness, with its standard error over problems) and mean length:

* plain sampling vs GenARM with the correct ARM for each alpha in ``guide.alphas``; a control
  row uses the *untrained* base as the "ARM", i.e. plain sharpening ``pi^(1 + alpha)``, to
  separate the learned reward from the temperature effect of the product;
* a multi-objective table over (alpha_correct, alpha_brevity) weight pairs;
* weak-to-strong: the half-depth ARM guiding the base.

Results: ``{out}/results.json`` and ``{out}/results.md``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax.methods.genarm import arm as arm_lib
from swiftjax.config import config_from_argv
from swiftjax.data import candidates as cands
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.world import model as wexp

ARM_NAMES = ("correct", "brevity", "weak")

DEFAULTS = {
    "seed": 0,
    "out": "runs/genarm",
    "world": {},           # WorldConfig fields (must match the world model's)
    "base": None,          # world model directory (default: the shipped one)
    "arms": ["correct", "brevity", "weak"],
    "candidates": {        # training-problem candidates the pairs come from
        "path": None,      # a candidate jsonl; null: sample them from the base
        "n_problems": 2000, "n": 8, "temperature": 1.0, "max_new_tokens": 64, "prompt_len": 64,
        "batch_size": 512, "seed": 1,
    },
    "pairs": {"max_per_prompt": 4, "min_len_gap": 3, "brevity_from": "all", "max_len": 128, "val_frac": 0.1},
    "train": {
        "beta_r": 0.5, "gamma": 0.0, "loss": "sigmoid", "length_normalize": False,
        "epochs": 2, "max_steps": None, "batch_size": 32, "lr": 3.0e-5, "warmup_steps": 50,
        "weight_decay": 0.05, "clip_norm": 1.0, "eval_every": 0,
        "lora": False, "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_lr": 1.0e-4,
    },
    "weak": {"init": "truncate", "layers": None, "sft_steps": 300, "sft_lr": 1.0e-3, "sft_batch_size": 64,
             "sft_examples": 20000, "sft_max_len": 96},
    "guide": {
        "split": "test", "n_problems": 300, "n": 4, "temperature": 1.0, "max_new_tokens": 64,
        "prompt_len": 64, "batch_size": 256, "seed": 0,
        "alphas": [0.0, 0.5, 1.0, 2.0, 4.0],
        "control": True,
        "weights": [[1.0, 0.0], [1.0, 0.5], [1.0, 1.0], [1.0, 2.0], [0.0, 1.0], [0.0, 2.0]],
        "weak_alphas": [0.5, 1.0, 2.0],
    },
}


# ----------------------------------------------------------------------------- config


def _parse(argv) -> dict:
    cfg = config_from_argv(argv, DEFAULTS)
    bad = [a for a in cfg["arms"] if a not in ARM_NAMES]
    if bad:
        raise ValueError(f"arms: expected names from {ARM_NAMES}, got {bad}")
    if cfg["weak"]["init"] not in ("truncate", "scratch"):
        raise ValueError(f"weak.init: expected 'truncate' or 'scratch', got {cfg['weak']['init']!r}")
    if cfg["train"]["loss"] not in ("sigmoid", "hinge"):
        raise ValueError(f"train.loss: expected 'sigmoid' or 'hinge', got {cfg['train']['loss']!r}")
    return cfg


def arm_dir(cfg: dict, name: str) -> Path:
    return Path(cfg["out"]) / f"arm_{name}"


# ----------------------------------------------------------------------------- pairs


def response_ids(tok, row) -> list[int]:
    """A candidate's response token ids (its sampled ``token_ids`` when present, else the
    tokenised text followed by <|end|>)."""
    if row.get("token_ids") is not None:
        return [int(t) for t in row["token_ids"]]
    return wtok.encode(tok, row["text"]) + [wtok.END_ID]


def _by_prompt(rows) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    return groups


def correctness_pairs(rows, tok, max_per_prompt: int, seed: int) -> list[tuple[str, list, list]]:
    """(prompt, chosen ids, rejected ids): a correct vs an incorrect solution of the same
    problem, at most ``max_per_prompt`` distinct pairs a problem, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for pid, group in _by_prompt(rows).items():
        good = [r for r in group if r["correct"]]
        bad = [r for r in group if not r["correct"]]
        combos = [(g, b) for g in range(len(good)) for b in range(len(bad))]
        if not combos:
            continue
        pick = rng.permutation(len(combos))[:max_per_prompt]
        for j in pick:
            g, b = combos[j]
            out.append((group[0]["prompt"], response_ids(tok, good[g]), response_ids(tok, bad[b])))
    return out


def brevity_pairs(rows, tok, max_per_prompt: int, min_gap: int, seed: int,
                  among: str = "correct") -> list[tuple[str, list, list]]:
    """(prompt, shorter ids, longer ids) with a length gap >= ``min_gap`` tokens, between two
    correct solutions of a problem (``among='correct'``) or any two of its candidates
    (``'all'``)."""
    if among not in ("correct", "all"):
        raise ValueError(f"pairs.brevity_from: expected 'correct' or 'all', got {among!r}")
    rng = np.random.default_rng(seed)
    out = []
    for pid, group in _by_prompt(rows).items():
        good = [response_ids(tok, r) for r in group if r["correct"] or among == "all"]
        combos = [(i, j) for i in range(len(good)) for j in range(len(good))
                  if len(good[j]) - len(good[i]) >= min_gap]
        if not combos:
            continue
        for k in rng.permutation(len(combos))[:max_per_prompt]:
            i, j = combos[k]
            out.append((group[0]["prompt"], good[i], good[j]))
    return out


def encode_pairs(tok, pairs, max_len: int) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Right-padded arrays ``{ids,mask,resp}_{w,l}`` [N, max_len] int32 (resp marks the response
    tokens); pairs that do not fit in ``max_len`` are dropped. Returns (arrays, n_dropped,
    groups [N]: the index of each kept pair's prompt in order of first appearance)."""
    rows = {k: [] for k in ("ids_w", "mask_w", "resp_w", "ids_l", "mask_l", "resp_l")}
    dropped = 0
    cache: dict[str, list] = {}
    group_of: dict[str, int] = {}
    groups = []
    for prompt, w, l in pairs:
        p = cache.setdefault(prompt, wtok.encode(tok, wtok.format_prompt(prompt)))
        if len(p) + max(len(w), len(l)) > max_len:
            dropped += 1
            continue
        groups.append(group_of.setdefault(prompt, len(group_of)))
        for tag, resp in (("w", w), ("l", l)):
            ids = np.full(max_len, wtok.PAD_ID, np.int32)
            mask = np.zeros(max_len, np.int32)
            rm = np.zeros(max_len, np.int32)
            n = len(p) + len(resp)
            ids[:n] = p + list(resp)
            mask[:n] = 1
            rm[len(p):n] = 1
            rows[f"ids_{tag}"].append(ids)
            rows[f"mask_{tag}"].append(mask)
            rows[f"resp_{tag}"].append(rm)
    arrays = {k: (np.stack(v) if v else np.zeros((0, max_len), np.int32)) for k, v in rows.items()}
    return arrays, dropped, np.asarray(groups, np.int64)


def split_pairs(arrays: dict, groups, val_frac: float, seed: int) -> tuple[dict, dict | None]:
    """(train, validation) split BY PROBLEM: a seeded ``round(val_frac * problems)`` of the
    problems (``groups`` [N], one id per pair) hold out all their pairs, so the validation
    accuracy measures generalisation to new problems. Validation is None when it would be
    empty; it never takes every problem."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"pairs.val_frac: expected a number in [0, 1), got {val_frac!r}")
    groups = np.asarray(groups)
    if groups.shape != (len(arrays["ids_w"]),):
        raise ValueError(f"groups: expected one id per pair ({len(arrays['ids_w'])},), got {groups.shape}")
    uniq = np.unique(groups)
    n_val = min(int(round(len(uniq) * val_frac)), len(uniq) - 1) if len(uniq) > 1 else 0
    if n_val == 0:
        return arrays, None
    held = np.random.default_rng(seed).permutation(uniq)[:n_val]
    is_val = np.isin(groups, held)
    return {k: v[~is_val] for k, v in arrays.items()}, {k: v[is_val] for k, v in arrays.items()}


# ----------------------------------------------------------------------------- losses


def pair_logprobs(model, batch):
    """Summed response-token log-probs of chosen and rejected ([B] each), one forward of [2B, T]."""
    from swiftjax.logprobs import response_token_logprobs

    ids = jnp.concatenate([batch["ids_w"], batch["ids_l"]])
    mask = jnp.concatenate([batch["mask_w"], batch["mask_l"]])
    resp = jnp.concatenate([batch["resp_w"], batch["resp_l"]])
    lp, m = response_token_logprobs(model, ids, mask, resp)
    seq = jnp.sum(lp * m, axis=-1)
    n = batch["ids_w"].shape[0]
    return seq[:n], seq[n:], m[:n].sum(-1), m[n:].sum(-1)


def make_arm_loss(beta_r: float, gamma: float, kind: str, length_normalize: bool):
    """``fn(model, batch, rng) -> (loss, metrics)``: the ARM preference loss on a pair batch."""

    def fn(model, batch, rng=None):
        lw, ll, nw, nl = pair_logprobs(model, batch)
        kw = dict(length_normalize=True, len_w=nw, len_l=nl) if length_normalize else {}
        return arm_lib.arm_loss(lw, ll, beta_r, gamma, kind, **kw)

    return fn


# ----------------------------------------------------------------------------- models


def truncated_model(model, mcfg, n_layers: int, seed: int = 0):
    """A model with the first ``n_layers`` blocks of ``model`` (embeddings, final norm and head
    copied too). Returns (model, config)."""
    from swiftjax.models.registry import create_model

    if not 1 <= n_layers <= mcfg.num_layers:
        raise ValueError(f"weak.layers: expected 1..{mcfg.num_layers}, got {n_layers}")
    cfg = mcfg.replace(num_layers=n_layers)
    small = create_model(cfg, seed=seed)
    src = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    leaves = [(p, v.replace(src[p][...])) for p, v in nnx.to_flat_state(nnx.state(small, nnx.Param))]
    nnx.update(small, nnx.from_flat_state(leaves))
    return small, cfg


def _optimizer(tcfg: dict, lr: float, total: int):
    from swiftjax.train import loop

    warm = min(int(tcfg["warmup_steps"]), total // 2)
    return loop.OptimizerConfig(name="adamw", lr=float(lr), weight_decay=float(tcfg["weight_decay"]),
                                schedule="cosine", warmup_steps=warm, total_steps=max(total, warm + 1),
                                clip_norm=tcfg["clip_norm"])


def _steps(n: int, bs: int, epochs, max_steps) -> int:
    per = n // bs
    total = per * int(epochs) if epochs is not None else None
    if max_steps is not None:
        total = int(max_steps) if total is None else min(total, int(max_steps))
    if not total:
        raise ValueError(f"train: expected at least one step, got {n} examples / batch {bs}, "
                         f"epochs={epochs}, max_steps={max_steps}")
    return total


def train_arm(model, train_arrays: dict, val_arrays: dict | None, tcfg: dict, seed: int, *, desc: str,
              progress: bool = True, writer=None):
    """Train ``model`` (in place semantics: returns the trained module) with the ARM loss.

    Full fine-tune, or LoRA adapters (merged into the weights before returning) when
    ``tcfg['lora']``. Returns (model, summary dict)."""
    from swiftjax.methods.genarm import lora as lora_lib
    from swiftjax.batching import epoch_batches
    from swiftjax.train import loop

    n = len(train_arrays["ids_w"])
    if n == 0:
        raise ValueError(f"{desc}: expected preference pairs to train on, got none")
    bs = min(int(tcfg["batch_size"]), n)
    total = _steps(n, bs, tcfg["epochs"], tcfg["max_steps"])
    use_lora = bool(tcfg["lora"])
    if use_lora:
        lora_lib.apply_lora(model, int(tcfg["lora_rank"]), float(tcfg["lora_alpha"]),
                            tuple(tcfg["lora_targets"]), rngs=seed, dropout=float(tcfg["lora_dropout"]))
    opt = _optimizer(tcfg, tcfg["lora_lr"] if use_lora else tcfg["lr"], total)
    tx = loop.make_optimizer(opt)
    graphdef, params, frozen = loop.nnx_split(model, wrt=nnx.LoRAParam if use_lora else nnx.Param)
    fn = make_arm_loss(float(tcfg["beta_r"]), float(tcfg["gamma"]), tcfg["loss"], bool(tcfg["length_normalize"]))
    loss_fn = loop.nnx_loss(graphdef, lora_lib.with_lora_dropout(fn) if use_lora else fn)
    state = loop.init_state(params, tx, seed, frozen=frozen)
    step = loop.make_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(opt))
    eval_fn = None
    if val_arrays is not None and len(val_arrays["ids_w"]):
        vb = min(64, len(val_arrays["ids_w"]))
        val_batches = [{k: jnp.asarray(v[i:i + vb]) for k, v in val_arrays.items()}
                       for i in range(0, len(val_arrays["ids_w"]) - vb + 1, vb)]

        def metric(p, b, fr):
            return fn(loop.nnx_merge(graphdef, p, fr), b)[1]

        # the train step donates the whole state, frozen part included (the base weights under
        # LoRA): evaluation gets its own copy
        eval_fn = loop.make_eval_fn(metric, val_batches, frozen=jax.tree.map(jnp.copy, frozen))
    t0 = time.time()
    res = loop.fit(state, step, epoch_batches(train_arrays, bs, seed), max_steps=total,
                   eval_fn=eval_fn, eval_every=int(tcfg["eval_every"] or 0) if eval_fn else 0,
                   writer=writer, log_every=10, progress=progress, desc=desc)
    model = loop.nnx_merge(graphdef, res.state.params, res.state.frozen)
    if use_lora:
        lora_lib.merge_lora(model)
    summary = {"pairs_train": n, "steps": res.steps, "seconds": round(time.time() - t0, 1),
               "lora": use_lora, "eval": res.history[-1] if res.history else None}
    return model, summary


def sft_warmup(model, tok, cfg: dict, steps: int, progress: bool = True):
    """A few SFT steps on world training solutions (for the weak ARM)."""
    from swiftjax.batching import epoch_batches
    from swiftjax.logprobs import sft_loss
    from swiftjax.train import loop

    w = cfg["weak"]
    problems = world.make_split("train", int(w["sft_examples"]), wexp.world_config(cfg), seed=cfg["seed"])
    data = wexp.encode_split(tok, problems, int(w["sft_max_len"]))
    bs = min(int(w["sft_batch_size"]), len(problems))
    opt = loop.OptimizerConfig(name="adamw", lr=float(w["sft_lr"]), weight_decay=0.1, b2=0.98,
                               schedule="cosine", warmup_steps=min(50, steps // 2), total_steps=max(steps, 1 + min(50, steps // 2)),
                               clip_norm=1.0)
    tx = loop.make_optimizer(opt)
    graphdef, params, frozen = loop.nnx_split(model)
    loss_fn = loop.nnx_loss(graphdef, lambda m, b, r: sft_loss(m, b, r))
    state = loop.init_state(params, tx, cfg["seed"], frozen=frozen)
    res = loop.fit(state, loop.make_train_step(loss_fn, tx), epoch_batches(data, bs, cfg["seed"]),
                   max_steps=steps, progress=progress, desc="weak ARM SFT")
    return loop.nnx_merge(graphdef, res.state.params, res.state.frozen)


# ----------------------------------------------------------------------------- train_main


def training_candidates(cfg: dict, model_dir: Path, model, tok, progress: bool = True) -> list[dict]:
    """The ARM's training candidates: ``candidates.path``, or sampled from the base model at
    ``model_dir`` into ``out/candidates_train.jsonl`` (reused while their key is unchanged)."""
    c = cfg["candidates"]
    if c["path"]:
        return cands.read_candidates(c["path"])
    key = {k: c[k] for k in ("n_problems", "n", "temperature", "max_new_tokens", "prompt_len", "batch_size", "seed")}
    key.update(split="train", split_seed=cfg["seed"], world=cfg.get("world") or {},
               model_sha256=wexp.model_digest(model_dir))

    def sample():
        problems = world.make_split("train", int(c["n_problems"]), wexp.world_config(cfg), seed=cfg["seed"])
        return wexp.sample_candidates(model, tok, problems, n=int(c["n"]), temperature=float(c["temperature"]),
                                      max_new_tokens=int(c["max_new_tokens"]), prompt_len=int(c["prompt_len"]),
                                      batch_size=int(c["batch_size"]), seed=int(c["seed"]), progress=progress)

    return cands.cached_candidates(Path(cfg["out"]) / "candidates_train.jsonl", key, sample)


def _check_train_split(rows) -> None:
    bad = sorted({r["prompt_id"] for r in rows if world.split_of(r["prompt"]) != "train"})
    if bad:
        raise ValueError(f"candidates: expected TRAINING problems only, got {len(bad)} prompts from other "
                         f"splits (first: {bad[0]!r})")


def train(cfg: dict, progress: bool = True) -> dict:
    """Build pairs, train the ARMs named in ``cfg['arms']``, save them; returns a summary."""
    from swiftjax.train import metrics

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    base_dir = wexp.default_model_dir({"sample": {"model": cfg["base"]}})
    base, mcfg, tok = wexp.load_world_model(base_dir)
    rows = training_candidates(cfg, base_dir, base, tok, progress)
    _check_train_split(rows)
    p = cfg["pairs"]
    seed = int(cfg["seed"])
    pair_sets = {}
    if "correct" in cfg["arms"] or "weak" in cfg["arms"]:
        pair_sets["correct"] = correctness_pairs(rows, tok, int(p["max_per_prompt"]), seed)
    if "brevity" in cfg["arms"]:
        pair_sets["brevity"] = brevity_pairs(rows, tok, int(p["max_per_prompt"]), int(p["min_len_gap"]), seed,
                                             among=p["brevity_from"])
    encoded = {}
    summary = {"base": str(base_dir), "candidates": len(rows),
               "candidate_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else 0.0,
               "pairs": {}, "arms": {}}
    for name, pairs in pair_sets.items():
        arrays, dropped, groups = encode_pairs(tok, pairs, int(p["max_len"]))
        encoded[name] = split_pairs(arrays, groups, float(p["val_frac"]), seed)
        summary["pairs"][name] = {"total": len(pairs), "dropped_too_long": dropped,
                                  "val": 0 if encoded[name][1] is None else len(encoded[name][1]["ids_w"])}
    writer = metrics.JsonlWriter(out / "train_metrics.jsonl")
    for name in cfg["arms"]:
        data = encoded["correct" if name == "weak" else name]
        if len(data[0]["ids_w"]) == 0:
            summary["arms"][name] = {"skipped": f"no {'correct' if name == 'weak' else name} pairs"}
            print(f"train-arm: skipping the {name} ARM: no pairs")
            continue
        if name == "weak":
            model, acfg = _weak_init(cfg, base_dir, tok, progress)
        else:
            model, acfg = wexp.load_world_model(base_dir)[:2]
        model, info = train_arm(model, data[0], data[1], cfg["train"], seed, desc=f"ARM {name}",
                                progress=progress, writer=_Tagged(writer, name))
        info["layers"] = acfg.num_layers
        wexp.export(model, acfg, tok, arm_dir(cfg, name), overwrite=True)
        summary["arms"][name] = info
        print(f"ARM {name}: {info}")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _Tagged:
    """Adds ``arm=name`` to every record of a metrics writer."""

    def __init__(self, writer, name):
        self.writer, self.name = writer, name

    def write(self, step, record):
        self.writer.write(step, {"arm": self.name, **record})


def _weak_init(cfg: dict, base_dir, tok, progress: bool):
    from swiftjax.models.registry import create_model

    base, mcfg, _ = wexp.load_world_model(base_dir)
    w = cfg["weak"]
    n = int(w["layers"] or max(1, mcfg.num_layers // 2))
    if w["init"] == "truncate":
        model, acfg = truncated_model(base, mcfg, n, seed=int(cfg["seed"]))
    else:
        acfg = mcfg.replace(num_layers=n)
        model = create_model(acfg, seed=int(cfg["seed"]) + 1)
    if int(w["sft_steps"]) > 0:
        model = sft_warmup(model, tok, cfg, int(w["sft_steps"]), progress)
    return model, acfg


def train_main(argv) -> int:
    cfg = _parse(argv)
    train(cfg)
    return 0


# ----------------------------------------------------------------------------- guidance


def _prompts(cfg: dict, tok):
    g = cfg["guide"]
    problems = world.make_split(g["split"], int(g["n_problems"]), wexp.world_config(cfg), seed=cfg["seed"])
    qs = [p.question for p in problems for _ in range(int(g["n"]))]
    ids, mask = wtok.encode_prompts(tok, qs, int(g["prompt_len"]))
    return problems, np.asarray(ids), np.asarray(mask)


def decode_all(base, arms, alphas, ids, mask, gcfg: dict, eos) -> np.ndarray:
    """Tokens [R, N] of every prompt row, decoded in fixed [batch_size, T] batches with keys
    fold_in(seed, batch) (the same keys for every method: common random numbers)."""
    from swiftjax.methods.genarm.guided import guided_generate

    bs = int(gcfg["batch_size"])
    scfg = SamplingConfig(max_new_tokens=int(gcfg["max_new_tokens"]), temperature=float(gcfg["temperature"]),
                          eos_ids=eos, pad_id=wtok.PAD_ID)
    root = jax.random.key(int(gcfg["seed"]))
    total = len(ids)
    out = np.zeros((total, scfg.max_new_tokens), np.int32)
    for b, s in enumerate(range(0, total, bs)):
        e = min(s + bs, total)
        bi, bm = ids[s:e], mask[s:e]
        if e - s < bs:
            bi = np.concatenate([bi, np.repeat(bi[-1:], bs - (e - s), 0)])
            bm = np.concatenate([bm, np.repeat(bm[-1:], bs - (e - s), 0)])
        key = jax.random.fold_in(root, b)
        if arms:
            res = guided_generate(base, arms, alphas, bi, bm, key=key, cfg=scfg)
        else:
            res = generate(base, bi, bm, key=key, cfg=scfg)
        out[s:e] = np.asarray(res.tokens)[: e - s]
    return out


def score_tokens(tok, problems, n: int, tokens: np.ndarray) -> dict:
    """pass@1 (% correct over all samples), its standard error over problems, mean length in
    tokens (up to and including the end token) and the finished fraction."""
    correct = np.zeros(len(tokens), bool)
    lengths = np.zeros(len(tokens))
    finished = np.zeros(len(tokens), bool)
    for r, row in enumerate(tokens):
        stop = np.flatnonzero((row == wtok.END_ID) | (row == wtok.EOS_ID))
        finished[r] = stop.size > 0
        lengths[r] = stop[0] + 1 if stop.size else len(row)
        correct[r] = world.grade(wtok.decode_response(tok, row), problems[r // n].answer)
    per_problem = correct.reshape(len(problems), n).mean(1)
    se = float(per_problem.std(ddof=1) / np.sqrt(len(problems)) * 100) if len(problems) > 1 else 0.0
    return {"pass@1": float(correct.mean() * 100), "stderr": se, "mean_length": float(lengths.mean()),
            "finished": float(finished.mean() * 100)}


def guide(cfg: dict, progress: bool = True) -> dict:
    """Run every guided-decoding comparison the available ARMs allow; write results."""
    import swiftjax

    g = cfg["guide"]
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    base_dir = wexp.default_model_dir({"sample": {"model": cfg["base"]}})
    base, mcfg, tok = wexp.load_world_model(base_dir)
    arms, arm_toks = {}, {}
    for name in ARM_NAMES:
        d = arm_dir(cfg, name)
        if name in cfg["arms"] and (d / "model.safetensors").is_file():
            arms[name] = swiftjax.load_model(d)[0]
            arm_toks[name] = wtok.load_tokenizer(d)
            arm_lib.check_vocab_compatible(tok, arm_toks[name])
    problems, ids, mask = _prompts(cfg, tok)
    n = int(g["n"])
    eos = (wtok.END_ID, wtok.EOS_ID)
    t0 = time.time()

    def run(models, alphas):
        return score_tokens(tok, problems, n, decode_all(base, models, alphas, ids, mask, g, eos))

    res = {"config": {"guide": g, "base": str(base_dir), "arms": sorted(arms), "problems": len(problems)}}
    res["plain"] = run([], [])
    if progress:
        print(f"plain: {res['plain']}")
    if "correct" in arms:
        rows = []
        for a in g["alphas"]:
            r = {"alpha": float(a), **run([arms["correct"]], [float(a)])}
            if g["control"] and float(a) != 0.0:
                c = run([base], [float(a)])  # pi_base^(1 + alpha): sharpening only
                r["control_pass@1"], r["control_mean_length"] = c["pass@1"], c["mean_length"]
            rows.append(r)
            if progress:
                print(f"correct ARM {r}")
        res["correct"] = rows
    if "correct" in arms and "brevity" in arms:
        rows = []
        for wc, wb in g["weights"]:
            r = {"alpha_correct": float(wc), "alpha_brevity": float(wb),
                 **run([arms["correct"], arms["brevity"]], [float(wc), float(wb)])}
            rows.append(r)
            if progress:
                print(f"multi-objective {r}")
        res["multi_objective"] = rows
    if "weak" in arms:
        rows = []
        for a in g["weak_alphas"]:
            r = {"alpha": float(a), "arm_layers": arms["weak"].config.num_layers,
                 "base_layers": mcfg.num_layers, **run([arms["weak"]], [float(a)])}
            rows.append(r)
            if progress:
                print(f"weak-to-strong {r}")
        res["weak_to_strong"] = rows
    res["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(markdown(res))
    return res


def _fmt(r: dict) -> str:
    return f"{r['pass@1']:.1f} ± {r['stderr']:.1f} | {r['mean_length']:.1f} | {r['finished']:.0f}"


def markdown(res: dict) -> str:
    """The results as markdown tables."""
    c = res["config"]
    g = c["guide"]
    lines = ["# GenARM in the embedded world",
             "",
             f"{c['problems']} {g['split']} problems x {g['n']} samples, temperature {g['temperature']}, "
             f"{g['max_new_tokens']} new tokens; pass@1 in % (± s.e. over problems); length in tokens.",
             "",
             "| method | pass@1 | mean length | finished % |",
             "|---|---|---|---|",
             f"| plain sampling | {_fmt(res['plain'])} |"]
    if "correct" in res:
        lines += ["", "## Correctness ARM", "",
                  "| alpha | pass@1 | mean length | finished % | control pass@1 (pi^(1+alpha)) |",
                  "|---|---|---|---|---|"]
        for r in res["correct"]:
            ctrl = f"{r['control_pass@1']:.1f}" if "control_pass@1" in r else "-"
            lines.append(f"| {r['alpha']:g} | {_fmt(r)} | {ctrl} |")
    if "multi_objective" in res:
        lines += ["", "## Correctness + brevity ARMs", "",
                  "| alpha_correct | alpha_brevity | pass@1 | mean length | finished % |", "|---|---|---|---|---|"]
        for r in res["multi_objective"]:
            lines.append(f"| {r['alpha_correct']:g} | {r['alpha_brevity']:g} | {_fmt(r)} |")
    if "weak_to_strong" in res:
        lines += ["", "## Weak-to-strong (half-depth ARM guides the base)", "",
                  "| alpha | ARM layers / base layers | pass@1 | mean length | finished % |", "|---|---|---|---|---|"]
        for r in res["weak_to_strong"]:
            lines.append(f"| {r['alpha']:g} | {r['arm_layers']} / {r['base_layers']} | {_fmt(r)} |")
    return "\n".join(lines) + "\n"


def guide_main(argv) -> int:
    cfg = _parse(argv)
    guide(cfg)
    print((Path(cfg["out"]) / "results.md").read_text())
    return 0




def main(argv) -> int:
    """``swiftjax genarm train|guide CONFIG [k=v ...]``."""
    from swiftjax.config import subcommand

    return subcommand("genarm", {"train": train_main, "guide": guide_main}, argv)
