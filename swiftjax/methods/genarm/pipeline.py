"""GenARM for any (Backbone, Task): train autoregressive reward models (ARMs) from the backbone,
then guide the backbone's decoding with them. The method: docs/genarm.md.

    swiftjax genarm train CONFIG [key=value ...]   # pairs -> ARMs (HF dirs under out/)
    swiftjax genarm guide CONFIG [key=value ...]   # guided decoding tables

Training (:func:`train`):

* Preference pairs come from ``candidates.n`` responses per TRAINING problem of the task,
  sampled from the backbone by :func:`swiftjax.sample.candidate_set` (reused while the
  backbone, the task and the sampling settings are unchanged). With ``pairs.demonstrations``,
  each training problem's worked solution (the task's demonstration, graded by the task)
  joins its candidates: the positive side of the pairs when the backbone rarely solves a
  problem itself. **correct** pairs: a correct vs an incorrect response of the same problem;
  **brevity** pairs: a shorter vs a longer response, at least ``pairs.min_len_gap`` tokens
  apart (both correct with ``pairs.brevity_from: correct``, any two with ``all``).
* Each ARM starts from the backbone's model (full fine-tune by default, ``train.lora=true``
  for LoRA adapters merged at the end) and is trained with
  :func:`swiftjax.methods.genarm.arm.arm_loss` on the float32 sums of its response-token
  log-probs (the end-of-turn id included, prompt masked).
* The **weak** ARM has fewer layers (half by default): the backbone's first blocks
  (``weak.init: truncate``) or a random model (``scratch``), briefly fine-tuned on the task's
  demonstration solutions (``weak.sft_steps``, on the first ``weak.sft_examples`` training
  problems), then trained on the correct pairs.
* ``pairs.val_frac`` of the training problems (all their pairs) are held out; the ARM's
  preference accuracy on them is reported after training.
* ARMs are saved as HF directories ``{out}/arm_{name}`` with the backbone's tokenizer files
  and ``arm.json`` (the backbone and task they came from, the training summary).

Guidance (:func:`guide`) samples ``guide.n`` responses per problem of ``guide.split`` with the
same sampling settings for every method and the same PRNG keys (common random numbers) and
reports pass@1 (mean correctness by the task's grader, with its standard error over problems),
mean length and the finished fraction:

* plain sampling vs GenARM with the correct ARM for each alpha in ``guide.alphas``; a control
  row uses the *untrained* base as the "ARM", i.e. plain sharpening ``pi^(1 + alpha)``, to
  separate the learned reward from the temperature effect of the product;
* a multi-objective table over (alpha_correct, alpha_brevity) weight pairs;
* weak-to-strong: the smaller ARM guiding the base.

Results: ``{out}/results.json`` (with the backbone's and the task's description) and
``{out}/results.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax.parallel import MeshConfig, use_mesh
from swiftjax._io import atomic_file
from swiftjax.backbone import Backbone, BackboneConfig, load_backbone
from swiftjax.batching import epoch_batches, padded_batches, take
from swiftjax.config import parse_typed, subcommand, to_plain
from swiftjax.logprobs import response_token_logprobs, sft_loss
from swiftjax.methods.genarm import arm as arm_lib
from swiftjax.methods.genarm import lora as lora_lib
from swiftjax.methods.genarm.guided import guided_generate
from swiftjax.models.load import save_model
from swiftjax.models.registry import create_model
from swiftjax.methods.preference.pairs import PreferencePairs
from swiftjax.sample import SamplingSection, candidate_set, check_writable, demonstration_rows, prompt_width
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.tasks import Task, TaskConfig, make_task
from swiftjax.train import loop, metrics

__all__ = ["GenarmConfig", "CandidatesSection", "PairsSection", "ArmTrainConfig", "WeakSection", "GuideSection",
           "ARM_NAMES", "backbone_of", "arm_dir", "training_candidates", "correctness_pairs",
           "brevity_pairs", "encode_pairs", "split_pairs", "make_arm_loss", "copy_model", "truncated_model",
           "train_arm", "sft_warmup", "train", "save_arm", "load_arms", "decode_all", "score_tokens", "guide",
           "markdown", "main"]

ARM_NAMES = ("correct", "brevity", "weak")
ArmName = Literal["correct", "brevity", "weak"]

# the files of a model directory that describe its tokenizer and generation: an ARM carries the base's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CandidatesSection:
    """The training problems' sampled responses the pairs come from: ``n`` per problem."""

    n: int = 8
    sampling: SamplingSection = SamplingSection()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n: expected a positive int, got {self.n}")


@dataclasses.dataclass(frozen=True)
class PairsSection:
    """``max_per_prompt``: pairs drawn per problem; ``min_len_gap``: brevity pairs' length gap
    in tokens; ``brevity_from``: brevity pairs between any two responses (all) or two correct
    ones; ``max_len``: prompt + response tokens (longer pairs are dropped; null: no limit but
    the model's context); ``val_frac``: held-out problems; ``demonstrations``: add each
    training problem's demonstration solution to its candidates."""

    max_per_prompt: int = 4
    min_len_gap: int = 3
    brevity_from: Literal["all", "correct"] = "all"
    max_len: int | None = None
    val_frac: float = 0.1
    demonstrations: bool = False

    def __post_init__(self):
        if self.max_per_prompt < 1:
            raise ValueError(f"max_per_prompt: expected a positive int, got {self.max_per_prompt}")
        if not 0.0 <= self.val_frac < 1.0:
            raise ValueError(f"val_frac: expected a number in [0, 1), got {self.val_frac}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len: expected an int >= 2 or null, got {self.max_len}")


@dataclasses.dataclass(frozen=True)
class ArmTrainConfig:
    """ARM training (:func:`swiftjax.methods.genarm.arm.arm_loss` on summed response log-probs):
    AdamW, cosine schedule with warm-up; ``epochs`` and/or ``max_steps`` (whichever ends first);
    ``eval_every``: 0 evaluates once at the end. ``lora``: LoRA adapters (``lora_*``, trained at
    ``lora_lr``) merged into the saved ARM instead of a full fine-tune at ``lr``."""

    beta_r: float = 0.5
    gamma: float = 0.0
    loss: Literal["sigmoid", "hinge"] = "sigmoid"
    length_normalize: bool = False
    epochs: int | None = 2
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 3e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    clip_norm: float | None = 1.0
    eval_every: int = 0
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    lora_lr: float = 1e-4

    def __post_init__(self):
        if self.beta_r <= 0:
            raise ValueError(f"beta_r: expected a positive number, got {self.beta_r}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("expected epochs or max_steps (or both), got neither")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class WeakSection:
    """The weak-to-strong ARM: ``layers`` (null: half the base's), from the base's first blocks
    (truncate) or random (scratch); ``sft_steps`` of SFT on the task's demonstrations of the
    first ``sft_examples`` training problems (null: the task's training split) first."""

    init: Literal["truncate", "scratch"] = "truncate"
    layers: int | None = None
    sft_steps: int = 300
    sft_lr: float = 1e-3
    sft_batch_size: int = 64
    sft_examples: int | None = None
    sft_max_len: int | None = None


@dataclasses.dataclass(frozen=True)
class GuideSection:
    """Guided decoding: ``n`` samples per problem of ``split``, every method with the same
    ``sampling`` settings and keys (``seed``). ``weights``: (alpha_correct, alpha_brevity)
    rows; ``control``: also the untrained base as "ARM" (pi^(1+alpha), sharpening only)."""

    split: Literal["train", "test"] = "test"
    n: int = 4
    sampling: SamplingSection = SamplingSection(batch_size=256)
    seed: int = 0
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    control: bool = True
    weights: tuple[tuple[float, ...], ...] = ((1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (0.0, 1.0), (0.0, 2.0))
    weak_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n: expected a positive int, got {self.n}")
        bad = [list(w) for w in self.weights if len(w) != 2]
        if bad:
            raise ValueError(f"weights: expected (alpha_correct, alpha_brevity) pairs, got {bad[0]}")


@dataclasses.dataclass(frozen=True)
class GenarmConfig:
    """Every default of ``genarm train`` / ``genarm guide``; YAML files and ``key=value``
    overrides only override.

    model: an HF causal-LM directory, or ``world`` (the shipped world model): the base the
      ARMs start from and the model guided decoding steers.
    template / system / dtype: how the backbone is prompted (:class:`swiftjax.backbone.BackboneConfig`).
    arms: which ARMs to train / use. cache: where candidate sets are kept (null: ``out``).
    mesh: the device mesh for sampling, ARM training and guided decoding
      (:class:`swiftjax.parallel.MeshConfig`; default one device).
    """

    model: str = "world"
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"
    task: TaskConfig = TaskConfig()
    out: str = "runs/genarm"
    cache: str | None = None
    seed: int = 0
    progress: bool = True
    arms: tuple[ArmName, ...] = ARM_NAMES
    candidates: CandidatesSection = CandidatesSection()
    pairs: PairsSection = PairsSection()
    train: ArmTrainConfig = ArmTrainConfig()
    weak: WeakSection = WeakSection()
    guide: GuideSection = GuideSection()
    mesh: MeshConfig = MeshConfig()


def backbone_of(cfg: GenarmConfig) -> Backbone:
    return load_backbone(BackboneConfig(path=cfg.model, template=cfg.template, system=cfg.system, dtype=cfg.dtype))


def arm_dir(cfg: GenarmConfig, name: str) -> Path:
    return Path(cfg.out) / f"arm_{name}"


# ----------------------------------------------------------------------------- pairs


def response_ids(backbone: Backbone, row) -> list[int]:
    """A candidate's response token ids: its sampled ``token_ids`` when present, else the
    backbone's rendering of ``text`` as an assistant turn (end-of-turn id included)."""
    if row.get("token_ids") is not None:
        return [int(t) for t in row["token_ids"]]
    return backbone.response_ids(row["prompt"], row["text"])


def _by_prompt(rows) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    return groups


def correctness_pairs(rows, backbone: Backbone, max_per_prompt: int, seed: int) -> list[tuple[str, list, list]]:
    """(prompt, chosen ids, rejected ids): a correct vs an incorrect response of the same
    problem, at most ``max_per_prompt`` distinct pairs a problem, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for pid, group in _by_prompt(rows).items():
        good = [r for r in group if r["correct"]]
        bad = [r for r in group if not r["correct"]]
        combos = [(g, b) for g in range(len(good)) for b in range(len(bad))]
        if not combos:
            continue
        for j in rng.permutation(len(combos))[:max_per_prompt]:
            g, b = combos[j]
            out.append((group[0]["prompt"], response_ids(backbone, good[g]), response_ids(backbone, bad[b])))
    return out


def brevity_pairs(rows, backbone: Backbone, max_per_prompt: int, min_gap: int, seed: int,
                  among: str = "correct") -> list[tuple[str, list, list]]:
    """(prompt, shorter ids, longer ids) with a length gap >= ``min_gap`` tokens, between two
    correct responses of a problem (``among='correct'``) or any two of its candidates
    (``'all'``)."""
    if among not in ("correct", "all"):
        raise ValueError(f"pairs.brevity_from: expected 'correct' or 'all', got {among!r}")
    rng = np.random.default_rng(seed)
    out = []
    for pid, group in _by_prompt(rows).items():
        good = [response_ids(backbone, r) for r in group if r["correct"] or among == "all"]
        combos = [(i, j) for i in range(len(good)) for j in range(len(good))
                  if len(good[j]) - len(good[i]) >= min_gap]
        if not combos:
            continue
        for k in rng.permutation(len(combos))[:max_per_prompt]:
            i, j = combos[k]
            out.append((group[0]["prompt"], good[i], good[j]))
    return out


def encode_pairs(backbone: Backbone, pairs, max_len: int | None) -> tuple[PreferencePairs, int, np.ndarray]:
    """The project's one pair type (:class:`PreferencePairs`, no reference columns) of the
    backbone's prompt + response, right-padded to T = ``max_len`` (null: the longest pair
    rounded up to 16); pairs that do not fit in ``max_len`` are dropped. Returns (pairs,
    n_dropped, groups [N]: the index of each kept pair's prompt in order of first appearance)."""
    plen = {q: len(backbone.prompt_ids(q)) for q in dict.fromkeys(q for q, _, _ in pairs)}
    need = [plen[q] + max(len(w), len(l)) for q, w, l in pairs]
    width = max_len if max_len is not None else max(16, -(-max(need, default=1) // 16) * 16)
    kept = [p for p, k in zip(pairs, need) if k <= width]
    group_of: dict[str, int] = {}
    groups = np.asarray([group_of.setdefault(q, len(group_of)) for q, _, _ in kept], np.int64)
    sides = []
    for col in (1, 2):
        if kept:
            sides.append(backbone.encode_pairs([p[0] for p in kept], [p[col] for p in kept], width))
        else:
            sides.append((np.zeros((0, width), np.int32),) * 3)
    return PreferencePairs.build(*sides), len(pairs) - len(kept), groups


def split_pairs(pairs: PreferencePairs, groups, val_frac: float, seed: int) -> tuple[PreferencePairs,
                                                                                   PreferencePairs | None]:
    """(train, validation) split BY PROBLEM: a seeded ``round(val_frac * problems)`` of the
    problems (``groups`` [N], one id per pair) hold out all their pairs, so the validation
    accuracy measures generalisation to new problems. Validation is None when it would be
    empty; it never takes every problem."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"pairs.val_frac: expected a number in [0, 1), got {val_frac!r}")
    groups = np.asarray(groups)
    if groups.shape != (len(pairs),):
        raise ValueError(f"groups: expected one id per pair ({len(pairs)},), got {groups.shape}")
    uniq = np.unique(groups)
    n_val = min(int(round(len(uniq) * val_frac)), len(uniq) - 1) if len(uniq) > 1 else 0
    if n_val == 0:
        return pairs, None
    held = np.random.default_rng(seed).permutation(uniq)[:n_val]
    is_val = np.isin(groups, held)
    return pairs.take(np.flatnonzero(~is_val)), pairs.take(np.flatnonzero(is_val))


# ----------------------------------------------------------------------------- losses


def pair_logprobs(model, batch):
    """Summed response-token log-probs of chosen and rejected ([B] each), one forward of [2B, T]."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    resp = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
    lp, m = response_token_logprobs(model, ids, mask, resp)
    seq = jnp.sum(lp * m, axis=-1)
    n = batch["chosen_ids"].shape[0]
    return seq[:n], seq[n:], m[:n].sum(-1), m[n:].sum(-1)


def make_arm_loss(beta_r: float, gamma: float, kind: str, length_normalize: bool):
    """``fn(model, batch, rng) -> (loss, metrics)``: the ARM preference loss on a pair batch."""

    def fn(model, batch, rng=None):
        lw, ll, nw, nl = pair_logprobs(model, batch)
        kw = dict(length_normalize=True, len_w=nw, len_l=nl) if length_normalize else {}
        return arm_lib.arm_loss(lw, ll, beta_r, gamma, kind, **kw)

    return fn


# ----------------------------------------------------------------------------- models


_copy_tree = jax.jit(lambda t: jax.tree.map(jnp.copy, t))  # one compilation, not one per array shape


def copy_model(model):
    """An independent copy of an nnx model (training donates its arrays; the base stays intact)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _copy_tree(state))


def truncated_model(model, mcfg, n_layers: int, seed: int = 0):
    """A model with copies of the first ``n_layers`` blocks of ``model`` (embeddings, final norm
    and head copied too; ``model`` is left intact). Returns (model, config)."""
    if not 1 <= n_layers <= mcfg.num_layers:
        raise ValueError(f"weak.layers: expected 1..{mcfg.num_layers}, got {n_layers}")
    cfg = mcfg.replace(num_layers=n_layers)
    small = create_model(cfg, seed=seed)
    src = {p: v for p, v in nnx.to_flat_state(_copy_tree(nnx.state(model, nnx.Param)))}
    leaves = [(p, v.replace(src[p][...])) for p, v in nnx.to_flat_state(nnx.state(small, nnx.Param))]
    nnx.update(small, nnx.from_flat_state(leaves))
    return small, cfg


def _optimizer(tcfg: ArmTrainConfig, lr: float, total: int) -> loop.OptimizerConfig:
    warm = min(tcfg.warmup_steps, total // 2)
    return loop.OptimizerConfig(name="adamw", lr=float(lr), weight_decay=tcfg.weight_decay,
                                schedule="cosine", warmup_steps=warm, total_steps=max(total, warm + 1),
                                clip_norm=tcfg.clip_norm)


def _steps(n: int, bs: int, epochs, max_steps) -> int:
    per = n // bs
    total = per * int(epochs) if epochs is not None else None
    if max_steps is not None:
        total = int(max_steps) if total is None else min(total, int(max_steps))
    if not total:
        raise ValueError(f"train: expected at least one step, got {n} examples / batch {bs}, "
                         f"epochs={epochs}, max_steps={max_steps}")
    return total


@functools.lru_cache(maxsize=8)
def _arm_train_step(graphdef, opt: loop.OptimizerConfig, tcfg: ArmTrainConfig):
    """(optimizer, loss fn, jitted train step) per (model structure, optimizer, recipe): ARMs of
    one structure trained with one schedule share a compilation."""
    tx = loop.make_optimizer(opt)
    fn = make_arm_loss(tcfg.beta_r, tcfg.gamma, tcfg.loss, tcfg.length_normalize)
    loss_fn = loop.nnx_loss(graphdef, lora_lib.with_lora_dropout(fn) if tcfg.lora else fn)
    return tx, fn, loop.make_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(opt))


def train_arm(model, train_pairs: PreferencePairs, val_pairs: PreferencePairs | None, tcfg: ArmTrainConfig,
              seed: int, *, desc: str,
              progress: bool = True, writer=None):
    """Train ``model`` (its arrays are donated: pass a copy to keep the original) with the ARM loss.

    Full fine-tune, or LoRA adapters (merged into the weights before returning) when
    ``tcfg.lora``. Returns (model, summary dict)."""
    n = len(train_pairs)
    train_arrays = train_pairs.arrays()
    if n == 0:
        raise ValueError(f"{desc}: expected preference pairs to train on, got none")
    bs = min(tcfg.batch_size, n)
    total = _steps(n, bs, tcfg.epochs, tcfg.max_steps)
    if tcfg.lora:
        lora_lib.apply_lora(model, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets, rngs=seed,
                            dropout=tcfg.lora_dropout)
    opt = _optimizer(tcfg, tcfg.lora_lr if tcfg.lora else tcfg.lr, total)
    graphdef, params, frozen = loop.nnx_split(model, wrt=nnx.LoRAParam if tcfg.lora else nnx.Param)
    tx, fn, step = _arm_train_step(graphdef, opt, tcfg)
    state = loop.init_state(params, tx, seed, frozen=frozen)
    eval_fn = None
    if val_pairs is not None and len(val_pairs):
        vb = min(64, len(val_pairs))
        val_batches = [{k: jnp.asarray(np.asarray(v)[i:i + vb]) for k, v in val_pairs.arrays().items()}
                       for i in range(0, len(val_pairs) - vb + 1, vb)]

        def metric(p, b, fr):
            return fn(loop.nnx_merge(graphdef, p, fr), b)[1]

        # the train step donates the whole state, frozen part included (the base weights under
        # LoRA): evaluation gets its own copy
        eval_fn = loop.make_eval_fn(metric, val_batches, frozen=_copy_tree(frozen))
    t0 = time.time()
    res = loop.fit(state, step, epoch_batches(train_arrays, bs, seed), max_steps=total,
                   eval_fn=eval_fn, eval_every=tcfg.eval_every if eval_fn else 0,
                   writer=writer, log_every=10, progress=progress, desc=desc)
    model = loop.nnx_merge(graphdef, res.state.params, res.state.frozen)
    if tcfg.lora:
        lora_lib.merge_lora(model)
    summary = {"pairs_train": n, "steps": res.steps, "seconds": round(time.time() - t0, 1),
               "lora": tcfg.lora, "eval": res.history[-1] if res.history else None}
    return model, summary


def _sft_arrays(backbone: Backbone, task: Task, problems, max_len: int | None) -> dict[str, np.ndarray]:
    """Teacher-forced demonstrations (the task's worked solutions) that fit in ``max_len``."""
    missing = [p.id for p in problems if p.solution is None]
    if missing:
        raise ValueError(f"weak.sft_steps: task {task.name} has no demonstration solution for problem "
                         f"{missing[0]!r}; set weak.sft_steps=0 (or name one with task.solution_field)")
    qs = [task.user_message(p) for p in problems]
    resps = [backbone.response_ids(q, p.solution) for q, p in zip(qs, problems)]
    plen = {q: len(backbone.prompt_ids(q)) for q in dict.fromkeys(qs)}
    need = [plen[q] + len(r) for q, r in zip(qs, resps)]
    width = max_len if max_len is not None else -(-max(need) // 16) * 16
    keep = [i for i, k in enumerate(need) if k <= width]
    if not keep:
        raise ValueError(f"weak.sft_max_len: every demonstration is longer than {width} tokens; raise it")
    ids, attn, resp = backbone.encode_pairs([qs[i] for i in keep], [resps[i] for i in keep], width)
    return {"ids": ids, "attention_mask": attn, "response_mask": resp}


def sft_warmup(model, data: dict[str, np.ndarray], wcfg: WeakSection, seed: int, progress: bool = True):
    """``wcfg.sft_steps`` SFT steps on teacher-forced demonstrations (for the weak ARM)."""
    steps = wcfg.sft_steps
    bs = min(wcfg.sft_batch_size, len(data["ids"]))
    warm = min(50, steps // 2)
    opt = loop.OptimizerConfig(name="adamw", lr=wcfg.sft_lr, weight_decay=0.1, b2=0.98, schedule="cosine",
                               warmup_steps=warm, total_steps=max(steps, 1 + warm), clip_norm=1.0)
    tx = loop.make_optimizer(opt)
    graphdef, params, frozen = loop.nnx_split(model)
    loss_fn = loop.nnx_loss(graphdef, lambda m, b, r: sft_loss(m, b, r))
    state = loop.init_state(params, tx, seed, frozen=frozen)
    res = loop.fit(state, loop.make_train_step(loss_fn, tx), epoch_batches(data, bs, seed),
                   max_steps=steps, progress=progress, desc="weak ARM SFT")
    return loop.nnx_merge(graphdef, res.state.params, res.state.frozen)


# ----------------------------------------------------------------------------- train


def training_candidates(cfg: GenarmConfig, backbone: Backbone, task: Task, *, log=print) -> tuple[list[dict], Path]:
    """The training problems' candidates (sampled or reused, :func:`swiftjax.sample.candidate_set`),
    plus each problem's demonstration (index ``candidates.n``) with ``pairs.demonstrations``."""
    demos = (demonstration_rows(backbone, task, task.problems("train"), cfg.candidates.n)
             if cfg.pairs.demonstrations else [])  # checked before sampling
    rows, path = candidate_set(backbone, task, "train", n=cfg.candidates.n, sampling=cfg.candidates.sampling,
                               seed=cfg.seed, out_dir=Path(cfg.cache or cfg.out), progress=cfg.progress, log=log)
    return rows + demos, path


class _Tagged:
    """Adds ``arm=name`` to every record of a metrics writer."""

    def __init__(self, writer, name):
        self.writer, self.name = writer, name

    def write(self, step, record):
        self.writer.write(step, {"arm": self.name, **record})


def _weak_sft_data(cfg: GenarmConfig, backbone: Backbone, task: Task) -> dict[str, np.ndarray] | None:
    """The weak ARM's SFT examples: the demonstrations of the first ``weak.sft_examples``
    training problems (None when the weak ARM is not trained or has no SFT)."""
    w = cfg.weak
    if "weak" not in cfg.arms or w.sft_steps <= 0:
        return None
    sft_task = make_task(dataclasses.replace(cfg.task, n_train=w.sft_examples)) if w.sft_examples else task
    return _sft_arrays(backbone, sft_task, sft_task.problems("train"), w.sft_max_len)


def _weak_init(cfg: GenarmConfig, backbone: Backbone, sft_data):
    mcfg = backbone.config
    w = cfg.weak
    n = w.layers or max(1, mcfg.num_layers // 2)
    if w.init == "truncate":
        model, acfg = truncated_model(backbone.model, mcfg, n, seed=cfg.seed)
    else:
        acfg = mcfg.replace(num_layers=n)
        model = create_model(acfg, seed=cfg.seed + 1)
    if w.sft_steps > 0:
        model = sft_warmup(model, sft_data, w, cfg.seed, cfg.progress)
    return model, acfg


def save_arm(model, acfg, backbone: Backbone, path: Path, meta: dict) -> Path:
    """An HF directory: the ARM's weights and config, the backbone's tokenizer files, arm.json."""
    extra = {name: (backbone.path / name).read_bytes() for name in TOKENIZER_FILES if (backbone.path / name).is_file()}
    extra["arm.json"] = json.dumps(meta, indent=2, default=str)
    return save_model(model, acfg, path, overwrite=True, extra_files=extra)


def train(cfg: GenarmConfig, backbone: Backbone | None = None, task: Task | None = None, *, log=print) -> dict:
    """Build pairs, train the ARMs named in ``cfg.arms``, save them; returns a summary."""
    out = check_writable(Path(cfg.out), "out")
    if cfg.cache:
        check_writable(Path(cfg.cache), "cache")
    backbone = backbone or backbone_of(cfg)
    task = task or make_task(cfg.task)
    sft_data = _weak_sft_data(cfg, backbone, task)  # before any work: the task has demonstrations
    rows, path = training_candidates(cfg, backbone, task, log=log)
    p = cfg.pairs
    pair_sets = {}
    if "correct" in cfg.arms or "weak" in cfg.arms:
        pair_sets["correct"] = correctness_pairs(rows, backbone, p.max_per_prompt, cfg.seed)
    if "brevity" in cfg.arms:
        pair_sets["brevity"] = brevity_pairs(rows, backbone, p.max_per_prompt, p.min_len_gap, cfg.seed,
                                             among=p.brevity_from)
    encoded = {}
    summary = {"model": backbone.describe(), "task": task.describe(), "candidates": len(rows),
               "candidates_path": str(path),
               "candidate_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else 0.0,
               "pairs": {}, "arms": {}, "config": to_plain(cfg)}
    for name, pairs in pair_sets.items():
        encoded_pairs, dropped, groups = encode_pairs(backbone, pairs, p.max_len)
        encoded[name] = split_pairs(encoded_pairs, groups, p.val_frac, cfg.seed)
        summary["pairs"][name] = {"total": len(pairs), "dropped_too_long": dropped,
                                  "val": 0 if encoded[name][1] is None else len(encoded[name][1])}
    with metrics.JsonlWriter(out / "train_metrics.jsonl") as writer:
        for name in cfg.arms:
            source = "correct" if name == "weak" else name
            data = encoded[source]
            if len(data[0]) == 0:
                summary["arms"][name] = {"skipped": f"no {source} pairs"}
                log(f"genarm train: skipping the {name} ARM: no {source} pairs")
                continue
            if name == "weak":
                model, acfg = _weak_init(cfg, backbone, sft_data)
            else:
                model, acfg = copy_model(backbone.model), backbone.config
            model, info = train_arm(model, data[0], data[1], cfg.train, cfg.seed, desc=f"ARM {name}",
                                    progress=cfg.progress, writer=_Tagged(writer, name))
            info["layers"] = acfg.num_layers
            save_arm(model, acfg, backbone, arm_dir(cfg, name),
                      {"arm": name, "base": backbone.describe(), "task": task.describe(), "train": info})
            summary["arms"][name] = info
            log(f"ARM {name}: {info}")
    with atomic_file(out / "train_summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2, default=str))
    return summary


def train_main(argv) -> int:
    cfg = parse_typed(GenarmConfig, argv, "genarm train")
    with use_mesh(cfg.mesh):
        train(cfg)
    return 0


# ----------------------------------------------------------------------------- guidance


def load_arms(cfg: GenarmConfig, backbone: Backbone) -> dict:
    """The trained ARMs of ``cfg.arms`` found under ``out`` (name -> model), each checked to
    come from this backbone and to share its token ids."""
    arms = {}
    for name in cfg.arms:
        d = arm_dir(cfg, name)
        if not (d / "arm.json").is_file():
            continue
        meta = json.loads((d / "arm.json").read_text(encoding="utf-8"))
        base = meta.get("base", {}).get("digest")
        if base != backbone.digest:
            raise ValueError(f"{d}: an ARM trained from model {meta.get('base', {}).get('path')} (digest "
                             f"{str(base)[:12]}), not from model={cfg.model} (digest {backbone.digest[:12]}); "
                             "train it again with genarm train")
        arm = load_backbone(BackboneConfig(path=str(d), template=cfg.template, system=cfg.system, dtype=cfg.dtype))
        arm_lib.check_vocab_compatible(backbone.tokenizer, arm.tokenizer)
        arms[name] = arm.model
    return arms


def decode_all(base, arms, alphas, ids, mask, scfg: SamplingConfig, *, batch_size: int, seed: int) -> np.ndarray:
    """Tokens [R, max_new_tokens] of every prompt row, decoded in fixed [batch_size, T] batches
    with keys fold_in(key(seed), batch) (the same keys for every method: common random numbers)."""
    root = jax.random.key(seed)
    total = len(ids)
    out = np.zeros((total, scfg.max_new_tokens), np.int32)
    for b, idx in enumerate(padded_batches(total, batch_size)):
        keep = idx >= 0
        bi, bm = take(ids, idx), take(mask, idx)
        key = jax.random.fold_in(root, b)
        if arms:
            res = guided_generate(base, arms, alphas, bi, bm, key=key, cfg=scfg)
        else:
            res = generate(base, bi, bm, key=key, cfg=scfg)
        out[idx[keep]] = np.asarray(res.tokens)[keep]
    return out


def score_tokens(backbone: Backbone, task: Task, problems, n: int, tokens: np.ndarray) -> dict:
    """pass@1 (% correct over all samples, by the task's grader), its standard error over
    problems, mean length in tokens (up to and including the end-of-turn id) and the finished
    fraction (% of samples that emitted an end-of-turn id)."""
    correct = np.zeros(len(tokens), bool)
    lengths = np.zeros(len(tokens))
    finished = np.zeros(len(tokens), bool)
    for r, row in enumerate(tokens):
        resp = backbone.trim_response(row)
        finished[r] = resp[-1] in backbone.eos_ids
        lengths[r] = len(resp)
        correct[r] = task.grade(backbone.decode_response(resp), problems[r // n].gold)[1]
    per_problem = correct.reshape(len(problems), n).mean(1)
    se = float(per_problem.std(ddof=1) / np.sqrt(len(problems)) * 100) if len(problems) > 1 else 0.0
    return {"pass@1": float(correct.mean() * 100), "stderr": se, "mean_length": float(lengths.mean()),
            "finished": float(finished.mean() * 100)}


def guide(cfg: GenarmConfig, *, log=print) -> dict:
    """Run every guided-decoding comparison the available ARMs allow; write results."""
    g = cfg.guide
    out = check_writable(Path(cfg.out), "out")
    backbone = backbone_of(cfg)
    task = make_task(cfg.task)
    base = backbone.model
    arms = load_arms(cfg, backbone)
    problems = task.problems(g.split)
    messages = [task.user_message(p) for p in problems for _ in range(g.n)]
    ids, mask = backbone.encode_prompts(messages, prompt_width(backbone, messages, prompt_len=g.sampling.prompt_len,
                                                          max_new_tokens=g.sampling.max_new_tokens,
                                                          field="guide.sampling"))
    scfg = SamplingConfig(max_new_tokens=g.sampling.max_new_tokens, temperature=g.sampling.temperature,
                          top_k=g.sampling.top_k, top_p=g.sampling.top_p, eos_ids=backbone.eos_ids,
                          pad_id=backbone.pad_id)
    t0 = time.time()

    def run(models, alphas):
        toks = decode_all(base, models, alphas, ids, mask, scfg, batch_size=g.sampling.batch_size, seed=g.seed)
        return score_tokens(backbone, task, problems, g.n, toks)

    res = {"config": to_plain(cfg), "model": backbone.describe(), "task": task.describe(), "arms": sorted(arms),
           "problems": len(problems)}
    res["plain"] = run([], [])
    log(f"plain: {res['plain']}")
    if "correct" in arms:
        rows = []
        for a in g.alphas:
            r = {"alpha": a, **run([arms["correct"]], [a])}
            if g.control and a != 0.0:
                c = run([base], [a])  # pi_base^(1 + alpha): sharpening only
                r["control_pass@1"], r["control_mean_length"] = c["pass@1"], c["mean_length"]
            rows.append(r)
            log(f"correct ARM {r}")
        res["correct"] = rows
    if "correct" in arms and "brevity" in arms:
        rows = []
        for wc, wb in g.weights:
            r = {"alpha_correct": wc, "alpha_brevity": wb, **run([arms["correct"], arms["brevity"]], [wc, wb])}
            rows.append(r)
            log(f"multi-objective {r}")
        res["multi_objective"] = rows
    if "weak" in arms:
        rows = []
        for a in g.weak_alphas:
            r = {"alpha": a, "arm_layers": arms["weak"].config.num_layers, "base_layers": backbone.config.num_layers,
                 **run([arms["weak"]], [a])}
            rows.append(r)
            log(f"weak-to-strong {r}")
        res["weak_to_strong"] = rows
    res["seconds"] = round(time.time() - t0, 1)
    with atomic_file(out / "results.json", "w") as f:
        f.write(json.dumps(res, indent=2, default=str))
    with atomic_file(out / "results.md", "w") as f:
        f.write(markdown(res))
    return res


def _fmt(r: dict) -> str:
    return f"{r['pass@1']:.1f} ± {r['stderr']:.1f} | {r['mean_length']:.1f} | {r['finished']:.0f}"


def markdown(res: dict) -> str:
    """The results as markdown tables."""
    g = res["config"]["guide"]
    lines = [f"# GenARM on {res['task']['name']} ({res['model']['path']})",
             "",
             f"{res['problems']} {g['split']} problems x {g['n']} samples, temperature {g['sampling']['temperature']}, "
             f"{g['sampling']['max_new_tokens']} new tokens; pass@1 in % (± s.e. over problems); length in tokens.",
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
        lines += ["", "## Weak-to-strong (a smaller ARM guides the base)", "",
                  "| alpha | ARM layers / base layers | pass@1 | mean length | finished % |", "|---|---|---|---|---|"]
        for r in res["weak_to_strong"]:
            lines.append(f"| {r['alpha']:g} | {r['arm_layers']} / {r['base_layers']} | {_fmt(r)} |")
    return "\n".join(lines) + "\n"


def guide_main(argv) -> int:
    cfg = parse_typed(GenarmConfig, argv, "genarm guide")
    with use_mesh(cfg.mesh):
        guide(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    return 0


def main(argv) -> int:
    """``swiftjax genarm train|guide CONFIG [k=v ...]``."""
    return subcommand("genarm", {"train": train_main, "guide": guide_main}, argv)
