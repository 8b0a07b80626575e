"""What the IRFT/RFT and DPO/MRPO drivers share: config sections, the SFT stage on a task's
demonstrations, sampling from an in-training policy, evaluation and the step loop.

Every model is a :class:`swiftjax.backbone.Backbone` (``model:`` any HF causal-LM directory,
or ``world``) and every problem, demonstration and grade comes from a
:class:`swiftjax.tasks.Task`.

SFT stage (``sft.steps > 0``): the backbone is fine-tuned on the task's training
demonstrations (``Problem.solution``, the assistant turn of
:meth:`Backbone.encode_examples`) with :func:`swiftjax.logprobs.sft_loss`, and saved as an HF
directory ``{out}/sft/model`` (the backbone's tokenizer files copied beside it). That directory
is the initial policy (and MRPO's primary reference ``init``); it is reused while the base
model, the task and the SFT settings are unchanged. ``sft.steps: 0``: the backbone is the
initial policy as it is.

Evaluation (:func:`evaluate`) on the task's test split: greedy accuracy (%), pass@1 (% correct
over ``eval.n_samples`` samples at ``eval.temperature``; 0 samples: not measured) and the mean
per-token log-prob of the test problems' reference solutions (when the task has them). Every
model is sampled with the same keys (``eval.seed``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from swiftjax import logprobs as lm
from swiftjax._io import atomic_file
from swiftjax.backbone import Backbone, BackboneConfig, load_backbone
from swiftjax.batching import check_batch_size, epoch_batches, padded_batches, take
from swiftjax.config import to_plain
from swiftjax.models.load import save_model
from swiftjax.sample import prompt_width as sample_prompt_width
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.tasks import Problem, Task
from swiftjax.train import loop
from swiftjax.train.metrics import to_python

__all__ = ["PRIMARY", "OptimizerSection", "GenerationSection", "SFTSection", "EvalSection", "backbone_config",
           "demonstrations", "demo_examples", "ensure_sft_policy", "prompt_width", "sampling_config", "sample_rows",
           "evaluate", "run_steps", "cycle", "clone", "write_results", "fmt"]

PRIMARY = "init"  # the name of the initial policy as a reference
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                    "special_tokens_map.json")


# ============================================================================= config sections


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """An optimizer recipe (:class:`swiftjax.train.loop.OptimizerConfig`); the step count comes
    from the stage that uses it. ``warmup_ratio``: linear warm-up over that fraction of the
    steps. RMSprop puts eps outside the square root (as the IRFT paper)."""

    name: Literal["adamw", "rmsprop", "sgd"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    final_lr_ratio: float = 0.0
    warmup_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.99
    momentum: float | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio}")

    def make(self, total_steps: int) -> loop.OptimizerConfig:
        total = max(int(total_steps), 1)
        warmup = int(round(self.warmup_ratio * total))
        kw = dict(name=self.name, lr=self.lr, weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps,
                  schedule=self.schedule, final_lr_ratio=self.final_lr_ratio, clip_norm=self.clip_norm,
                  rms_decay=self.rms_decay, momentum=self.momentum)
        if self.schedule == "cosine":
            warmup = min(warmup, total - 1)
            return loop.OptimizerConfig(**kw, warmup_steps=warmup, total_steps=total)
        return loop.OptimizerConfig(**kw, warmup_steps=warmup)


@dataclasses.dataclass(frozen=True)
class GenerationSection:
    """How every response is decoded (the temperature is each use's own). ``prompt_len``: the
    fixed prompt width (null: the longest prompt of the call, rounded up to 16);
    ``batch_size``: rows per decoded batch."""

    max_new_tokens: int = 64
    prompt_len: int | None = None
    batch_size: int = 64
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        SamplingConfig(max_new_tokens=self.max_new_tokens, top_k=self.top_k, top_p=self.top_p)
        check_batch_size(self.batch_size)
        if self.prompt_len is not None and self.prompt_len < 1:
            raise ValueError(f"prompt_len: expected a positive int or null, got {self.prompt_len}")


@dataclasses.dataclass(frozen=True)
class SFTSection:
    """The supervised stage on the task's training demonstrations (module doc). ``steps: 0``:
    none (the model is the initial policy). ``max_len``: the examples' width (null: the longest,
    rounded up to 16; longer demonstrations are dropped)."""

    steps: int = 0
    batch_size: int = 16
    max_len: int | None = None
    optimizer: OptimizerSection = OptimizerSection(name="adamw", lr=1e-5, schedule="cosine", warmup_ratio=0.1)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps: expected >= 0, got {self.steps}")
        check_batch_size(self.batch_size)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Evaluation on the task's test split (module doc). ``each_stage``: after every IRFT
    stage / RFT round (else only the last). ``batch_size``: teacher-forced log-prob batches.
    ``max_len``: the reference solutions' width (null: the longest, rounded up to 16)."""

    n_samples: int = 8
    temperature: float = 1.0
    seed: int = 0
    each_stage: bool = True
    batch_size: int = 64
    max_len: int | None = None

    def __post_init__(self):
        if self.n_samples < 0:
            raise ValueError(f"n_samples: expected >= 0, got {self.n_samples}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0 (greedy accuracy is measured separately), "
                             f"got {self.temperature}")
        check_batch_size(self.batch_size)


def backbone_config(cfg) -> BackboneConfig:
    """The BackboneConfig of a run config's ``model`` / ``template`` / ``system`` / ``dtype``."""
    return BackboneConfig(path=cfg.model, template=cfg.template, system=cfg.system, dtype=cfg.dtype)


# ============================================================================= demonstrations


def demonstrations(task: Task, split: str) -> list[Problem]:
    """The split's problems; each must carry a worked demonstration (``Problem.solution``)."""
    problems = task.problems(split)
    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise ValueError(f"task {task.name}: the {split} problems need worked demonstrations "
                         f"(Problem.solution), {len(missing)} have none (first {missing[0]!r}); "
                         f"for a jsonl task set task.solution_field")
    return problems


def _round16(n: int) -> int:
    return -(-int(n) // 16) * 16


def demo_examples(backbone: Backbone, task: Task, problems: Sequence[Problem], max_len: int | None):
    """Teacher-forced demonstrations ``{ids, attention_mask, response_mask}`` [n, T] and the
    kept problem indices (null ``max_len``: the longest, rounded up to 16; else longer ones dropped)."""
    msgs = [task.user_message(p) for p in problems]
    resp = [backbone.response_ids(m, p.solution) for m, p in zip(msgs, problems)]
    need = np.array([len(backbone.prompt_ids(m)) + len(r) for m, r in zip(msgs, resp)], np.int64)
    T = _round16(int(need.max())) if max_len is None else int(max_len)
    kept = np.flatnonzero(need <= T)
    ids, attn, rm = backbone.encode_pairs([msgs[i] for i in kept], [resp[i] for i in kept], T)
    return {"ids": ids, "attention_mask": attn, "response_mask": rm}, kept


# ============================================================================= the step loop


def clone(tree):
    return jax.tree.map(jnp.copy, tree)


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def run_steps(state, step_fn, batch_iter, n_steps: int, writer, tag: str, progress: bool, step0: int = 0):
    """Run ``n_steps`` steps; returns (state, list of host metric dicts)."""
    hist = []
    bar = tqdm(total=n_steps, desc=tag, disable=not progress, leave=False)
    for i in range(n_steps):
        state, m = step_fn(state, next(batch_iter))
        h = _host(m)
        hist.append(h)
        if writer is not None:
            writer.write(step0 + i + 1, {"phase": tag, **h})
        bar.update(1)
        bar.set_postfix(loss=f"{h['loss']:.4g}", refresh=False)
    bar.close()
    return state, hist


def cycle(batches):
    """An endless iterator over the epochs of an ``epoch_batches``-style callable."""
    epoch = 0
    while True:
        any_ = False
        for b in batches(epoch):
            any_ = True
            yield b
        if not any_:
            raise ValueError("training data: expected at least one batch per epoch, got none")
        epoch += 1


def write_results(out: Path, results: Mapping, md: str) -> None:
    with atomic_file(Path(out) / "results.json", "w") as f:
        f.write(json.dumps(to_python(results), indent=2) + "\n")
    with atomic_file(Path(out) / "results.md", "w") as f:
        f.write(md)


def fmt(x, nd=1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


# ============================================================================= SFT stage


def _sft_loss(model, batch, rng):
    return lm.sft_loss(model, batch, rng)


def _train_sft(backbone: Backbone, task: Task, sft: SFTSection, seed: int, writer, progress: bool):
    demos = demonstrations(task, "train")
    arrays, kept = demo_examples(backbone, task, demos, sft.max_len)
    if len(kept) == 0:
        raise ValueError(f"sft.max_len={sft.max_len}: every demonstration is longer; raise it or set it to null")
    opt = sft.optimizer.make(sft.steps)
    tx = loop.make_optimizer(opt)
    graphdef, params, rest = loop.nnx_split(backbone.model)
    step_fn = loop.make_train_step(loop.nnx_loss(graphdef, _sft_loss), tx, lr_fn=loop.learning_rate_fn(opt))
    state = loop.init_state(clone(params), tx, seed, frozen=rest)
    batches = epoch_batches(arrays, min(sft.batch_size, len(kept)), seed)
    state, hist = run_steps(state, step_fn, cycle(batches), sft.steps, writer, "sft", progress)
    info = {"steps": sft.steps, "demonstrations": int(len(kept)), "dropped_long": int(len(demos) - len(kept)),
            "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"]}
    return loop.nnx_merge(graphdef, state.params, rest), info


def ensure_sft_policy(bcfg: BackboneConfig, task: Task, sft: SFTSection, out: Path, *, seed: int, writer=None,
                      progress: bool = True, log=print) -> tuple[Backbone, Backbone, dict | None]:
    """(base backbone, initial policy backbone, SFT info or None). With ``sft.steps > 0`` the
    policy is ``{out}/sft/model``, trained here or reused (module doc)."""
    base = load_backbone(bcfg)
    if sft.steps == 0:
        return base, base, None
    sft_dir = Path(out) / "sft"
    model_dir = sft_dir / "model"
    key = {"base": base.digest, "task": task.describe(), "sft": to_plain(sft), "seed": seed}
    key_text = json.dumps(to_python(key), sort_keys=True, indent=1) + "\n"
    marker = sft_dir / "key.json"
    info_file = sft_dir / "info.json"
    pcfg = dataclasses.replace(bcfg, path=str(model_dir))
    if (marker.is_file() and marker.read_text(encoding="utf-8") == key_text
            and (model_dir / "model.safetensors").is_file() and info_file.is_file()):
        log(f"SFT policy: reusing {model_dir}")
        return base, load_backbone(pcfg), json.loads(info_file.read_text(encoding="utf-8"))
    t0 = time.time()
    model, info = _train_sft(base, task, sft, seed, writer, progress)
    extra = {n: (base.path / n).read_bytes() for n in _TOKENIZER_FILES if (base.path / n).is_file()}
    save_model(model, base.config, model_dir, overwrite=True, extra_files=extra)
    info["seconds"] = round(time.time() - t0, 1)
    with atomic_file(info_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(to_python(info), indent=1))
    with atomic_file(marker, "w", encoding="utf-8") as f:
        f.write(key_text)
    log(f"SFT: {info['steps']} steps on {info['demonstrations']} demonstrations, loss "
        f"{info['loss_first']:.4f} -> {info['loss_last']:.4f} -> {model_dir}")
    return base, load_backbone(pcfg), info


# ============================================================================= sampling, evaluation


def prompt_width(backbone: Backbone, messages: Sequence[str], gen: GenerationSection) -> int:
    return sample_prompt_width(backbone, messages, prompt_len=gen.prompt_len, max_new_tokens=gen.max_new_tokens,
                               field="generation")


def sampling_config(backbone: Backbone, gen: GenerationSection, temperature: float) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=gen.max_new_tokens, temperature=float(temperature), top_k=gen.top_k,
                          top_p=gen.top_p, eos_ids=backbone.eos_ids, pad_id=backbone.pad_id)


def sample_rows(backbone: Backbone, model, task: Task, problems: Sequence[Problem], *, n: int,
                gen: GenerationSection, temperature: float, seed: int) -> list[dict]:
    """``n`` responses per problem from ``model`` (an in-memory policy on ``backbone``'s
    tokenisation) as candidate rows, problem then index order. The one sampler
    (:func:`swiftjax.sampling.generate`) runs on fixed [batch_size, width] batches
    (:func:`swiftjax.batching.padded_batches`); batch b draws from ``fold_in(key(seed), b)``."""
    messages = [task.user_message(p) for p in problems]
    width = prompt_width(backbone, messages, gen)
    ids, mask = backbone.encode_prompts([m for m in messages for _ in range(n)], width)
    scfg = sampling_config(backbone, gen, temperature)
    base = jax.random.key(seed)
    rows = []
    for b, sel in enumerate(padded_batches(len(ids), gen.batch_size)):
        out = generate(model, take(ids, sel), take(mask, sel), key=jax.random.fold_in(base, b), cfg=scfg)
        tokens = np.asarray(out.tokens)
        for j, r in enumerate(sel):
            if r < 0:
                continue
            p = problems[r // n]
            resp = backbone.trim_response(tokens[j])
            text = backbone.decode_response(resp)
            ans, ok = task.grade(text, p.gold)
            rows.append({"prompt_id": p.id, "index": int(r % n), "prompt": messages[r // n], "text": text,
                         "token_ids": resp, "answer": ans, "correct": ok, "gold": p.gold})
    return rows


def evaluate(backbone: Backbone, model, task: Task, problems: Sequence[Problem], ev: EvalSection,
             gen: GenerationSection) -> dict:
    """greedy (%), pass@1 (%; None without samples) and ``gold_logp`` (mean per-token log-prob
    of the problems' reference solutions; None when the task has none)."""
    greedy = sample_rows(backbone, model, task, problems, n=1, gen=gen, temperature=0.0, seed=ev.seed)
    res = {"greedy": 100.0 * float(np.mean([r["correct"] for r in greedy])), "pass@1": None, "gold_logp": None}
    if ev.n_samples:
        samples = sample_rows(backbone, model, task, problems, n=ev.n_samples, gen=gen, temperature=ev.temperature,
                              seed=ev.seed)
        res["pass@1"] = 100.0 * float(np.mean([r["correct"] for r in samples]))
    with_gold = [p for p in problems if p.solution]
    if with_gold:
        arrays, kept = demo_examples(backbone, task, with_gold, ev.max_len)
        if len(kept):
            lp, ntok = lm.sequence_logprobs(model, arrays["ids"], arrays["attention_mask"],
                                            arrays["response_mask"], batch_size=ev.batch_size)
            res["gold_logp"] = float(np.sum(lp) / max(float(np.sum(ntok)), 1.0))
    return res
