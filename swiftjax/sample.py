"""N sampled candidates per problem, for any (Backbone, Task), written in shards that survive a kill.

    swiftjax sample CONFIG [key=value ...]      # e.g. configs/gsm8k/swift.yaml split=test

Every candidate set is named by the digest of everything it depends on (the backbone's
weights, tokenizer and template; the task, its files and wording; the problems; N, the seed,
the sampling settings and the batch layout). Shard ``b`` holds rows
``[b * batch_size, (b + 1) * batch_size)`` and is written atomically
(``<name>.shards/NNNNN.jsonl``) once all its rows are sampled; a killed run restarts at the
missing shards. Rows carry the sampler's confidence scores and each token's confidence
(format 5), so confidence-pruned sampling can be replayed offline. Two ways to decode:

* lock-step (``refill_every: null``, format 5): batch ``b`` is one fixed
  [batch_size, prompt_len] batch decoded until its longest row ends, drawing from
  ``fold_in(key(seed + split offset), b)``; its runs of identical prompts (the N samples of a
  problem) are prefilled once. Samples depend on which rows share a batch's key, so
  ``batch_size`` and ``prompt_len`` are part of the name; a resumed set is identical to an
  uninterrupted run's.
* continuous (``refill_every: k``, format 6, :mod:`swiftjax.stream`): ``batch_size`` slots,
  refilled with the next rows every k tokens, so no slot idles while a batch's longest row
  finishes. Row ``r`` draws from ``fold_in(key(seed + split offset), r)``: its sample does not
  depend on the rows beside it, and a resumed set equals an uninterrupted run's up to the float
  rounding of the batched arithmetic (the rows in flight at the kill ran beside other rows).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._io import atomic_file
from swiftjax.backbone import Backbone
from swiftjax.batching import padded_batches, take
from swiftjax.config import to_plain
from swiftjax.data import candidates as cands
from swiftjax.sampling import GenerateOutput, SamplingConfig, generate
from swiftjax.stream import stream_generate
from swiftjax.selection import sampler_confidences, token_confidence
from swiftjax.tasks import Task

__all__ = ["SamplingSection", "candidate_set", "digest", "split_seed", "check_writable", "prompt_width",
           "demonstration_rows"]

_SPLIT_OFFSET = {"test": 0, "train": 1}


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """How candidates are drawn. ``prompt_len``: the fixed prompt width (null: the split's
    longest prompt rounded up to a multiple of 16). ``batch_size``: rows decoded at once (and
    rows per shard). ``refill_every``: null decodes lock-step batches (each until its longest
    row ends); k > 0 decodes continuously (:mod:`swiftjax.stream`): ``batch_size`` slots, every
    k tokens the finished rows leave and the next rows take their slots, each row drawing
    from its own key."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    prompt_len: int | None = None
    batch_size: int = 64
    confidence_topk: int = 20     # > 0: rows carry the sampler's confidence scores (top-k of each step)
    confidence_window: int = 32   # DeepConf's lowest-group window, in tokens
    confidence_tail: int = 32     # DeepConf's tail, in tokens
    refill_every: int | None = None  # continuous batching: batch_size slots, finished ones refilled every k tokens

    def __post_init__(self):
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)  # the sampler's own checks
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size}")
        if self.prompt_len is not None and self.prompt_len < 1:
            raise ValueError(f"prompt_len: expected a positive int or null, got {self.prompt_len}")
        if self.confidence_topk < 0:
            raise ValueError(f"confidence_topk: expected an int >= 0, got {self.confidence_topk}")
        if self.refill_every is not None and (isinstance(self.refill_every, bool) or self.refill_every < 1):
            raise ValueError(f"refill_every: expected a positive int or null, got {self.refill_every}")
        if self.confidence_window < 1 or self.confidence_tail < 1:
            raise ValueError(f"confidence_window, confidence_tail: expected positive ints, got "
                             f"{self.confidence_window} and {self.confidence_tail}")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_seed(seed: int, split: str) -> int:
    return seed + _SPLIT_OFFSET[split]


def check_writable(path: Path, what: str) -> Path:
    """Create ``path`` as a directory (or check it is one) and that files can be written in it,
    before any work: a bad output location is an error up front, not after hours."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: expected a directory, {path} is an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what}: cannot write to {path} ({e.strerror})") from None
    return path


def prompt_width(backbone: Backbone, messages, *, prompt_len: int | None, max_new_tokens: int,
                 field: str = "sampling") -> int:
    """The fixed left-padded prompt width for ``messages``: ``prompt_len`` (an error when a prompt
    needs more), or the longest prompt rounded up to a multiple of 16; prompt + new tokens must
    fit the model's context. ``field`` names the config section in errors."""
    longest = max(len(backbone.prompt_ids(m)) for m in dict.fromkeys(messages))
    if prompt_len is not None:
        if longest > prompt_len:
            raise ValueError(f"{field}.prompt_len: a prompt needs {longest} tokens, more than prompt_len="
                             f"{prompt_len}; raise it or set it to null")
        width = prompt_len
    else:
        width = -(-longest // 16) * 16
    limit = int(backbone.config.max_position_embeddings)
    if width + max_new_tokens > limit:
        raise ValueError(f"{field}: prompt width {width} + max_new_tokens {max_new_tokens} exceed the model's "
                         f"context of {limit} positions")
    return width


def demonstration_rows(backbone: Backbone, task: Task, problems, index: int) -> list[dict]:
    """One candidate row per problem: its demonstration solution (as the backbone renders an
    assistant turn), graded by the task, at candidate ``index``."""
    rows = []
    for p in problems:
        if p.solution is None:
            raise ValueError(f"pairs.demonstrations: task {task.name} has no demonstration solution for problem "
                             f"{p.id!r} (a jsonl task names one with task.solution_field)")
        msg = task.user_message(p)
        ans, ok = task.grade(p.solution, p.gold)
        rows.append({"prompt_id": p.id, "index": index, "prompt": msg, "text": p.solution,
                     "token_ids": backbone.response_ids(msg, p.solution), "answer": ans, "correct": ok,
                     "gold": p.gold})
    return rows


def _shard_rows(backbone, task, problems, n, tokens, start, scores=None, token_conf=None):
    rows = []
    for j, resp in enumerate(tokens):
        r = start + j
        p = problems[r // n]
        resp_ids = backbone.trim_response(resp)
        text = backbone.decode_response(resp_ids)
        ans, ok = task.grade(text, p.gold)
        row = {"prompt_id": p.id, "index": r % n, "prompt": task.user_message(p), "text": text,
               "token_ids": resp_ids, "answer": ans, "correct": ok, "gold": p.gold}
        if scores:
            row["scores"] = {name: float(v[j]) for name, v in scores.items()}
        if token_conf is not None:  # per generated token (end token included), for confidence pruning
            row["token_confidence"] = [round(float(c), 4) for c in token_conf[j][: len(resp_ids)]]
        rows.append(row)
    return rows


def _rows_of(out: GenerateOutput, sel) -> GenerateOutput:
    """The rows ``sel`` (a mask or indices) of a sampler output, as NumPy arrays."""
    return jax.tree.map(lambda a: np.asarray(a)[sel], out)


def _confidences(backbone, out: GenerateOutput, sampling: SamplingSection) -> dict | None:
    """The sampler's confidence scores of the rows of ``out`` (selection.sampler_confidences)."""
    if not sampling.confidence_topk:
        return None
    return sampler_confidences(out.logprobs, out.mean_logprob, out.topk_logprobs, out.lengths,
                               int(backbone.config.vocab_size), window=sampling.confidence_window,
                               tail=sampling.confidence_tail)


def _read_shard(path: Path, expect: int, start: int, n: int, problems) -> list[dict] | None:
    """A finished shard's rows, or None when it is unreadable or not what this batch writes."""
    try:
        rows = cands.read_candidates(path)
    except (OSError, ValueError):
        return None
    if len(rows) != expect:
        return None
    for j, row in enumerate(rows):
        r = start + j
        if row["prompt_id"] != problems[r // n].id or row["index"] != r % n:
            return None
    return rows


def _hosts(hosts) -> tuple[int, int]:
    if hosts is None:
        return jax.process_index(), jax.process_count()
    i, p = hosts
    if not (isinstance(p, int) and p >= 1 and isinstance(i, int) and 0 <= i < p):
        raise ValueError(f"hosts: expected (process_index, process_count) with 0 <= index < count, got {hosts!r}")
    return i, p


def _wait_for(ready, what: str, wait_s: float, poll_s: float = 5.0):
    """Poll ``ready()`` until it returns a value other than None, at most ``wait_s`` seconds."""
    t0 = time.time()
    while True:
        got = ready()
        if got is not None:
            return got
        if time.time() - t0 >= wait_s:
            raise TimeoutError(f"waited {wait_s:.0f}s for {what} (SWIFTJAX_SHARD_WAIT sets the limit)")
        time.sleep(min(poll_s, max(wait_s - (time.time() - t0), 0.01)))


def candidate_set(backbone: Backbone, task: Task, split: str, *, n: int, sampling: SamplingSection, seed: int,
                  out_dir, progress: bool = True, log=print, hosts: tuple[int, int] | None = None
                  ) -> tuple[list[dict], Path]:
    """The N-per-problem candidate rows of ``task``'s ``split``, sampled or read back from
    ``out_dir`` (see the module doc). Returns (rows in problem-then-index order, path).

    Several hosts (``hosts`` = (process_index, process_count), default JAX's) share the work
    through ``out_dir`` on a filesystem they all see: host i samples the batches b with
    b % count == i, process 0 waits for every shard, writes the set and removes the shards,
    the other hosts wait for that file; every host returns the whole set. The set equals a
    single host's (each batch's key depends on b only). ``SWIFTJAX_SHARD_WAIT``: the longest
    wait in seconds (default one week)."""
    host, n_hosts = _hosts(hosts)
    problems = task.problems(split)
    messages = [task.user_message(p) for p in problems]
    width = prompt_width(backbone, messages, prompt_len=sampling.prompt_len,
                         max_new_tokens=sampling.max_new_tokens)
    plain = to_plain(sampling)
    if sampling.refill_every is None:  # lock-step sets keep the names they had before continuous batching
        del plain["refill_every"]
    key = {"format": 5 if sampling.refill_every is None else 6, "model": backbone.digest, "task": task.describe(),
           "split": split, "problems": digest([(p.id, m, p.gold) for p, m in zip(problems, messages)]), "n": n,
           "seed": seed, "sampling": plain, "prompt_len": width,
           "eos_ids": list(backbone.eos_ids), "pad_id": backbone.pad_id}
    out_dir = Path(out_dir)
    name = f"candidates_{split}_{digest(key)}"
    path = out_dir / f"{name}.jsonl"
    key_text = json.dumps(key, sort_keys=True, default=str, indent=1) + "\n"
    kp = cands.key_path(path)
    if path.is_file() and kp.is_file() and kp.read_text(encoding="utf-8") == key_text:
        log(f"candidates: {path}")
        return cands.read_candidates(path), path
    shard_dir = out_dir / f"{name}.shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    total, bs = len(problems) * n, sampling.batch_size
    n_batches = -(-total // bs)
    scfg = SamplingConfig(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, eos_ids=backbone.eos_ids,
                          pad_id=backbone.pad_id, record_topk=sampling.confidence_topk)
    base = jax.random.key(split_seed(seed, split))
    delay = float(os.environ.get("SWIFTJAX_SHARD_DELAY", "0") or 0)  # tests: time to kill between shards
    by_batch: dict[int, list[dict]] = {}
    others: dict[int, tuple[Path, int, int]] = {}  # batches other hosts sample: shard, rows, first row
    t0, done_before = time.time(), 0
    mine: list[tuple[int, np.ndarray, Path]] = []   # batches this host samples: (b, row indices, shard)
    for b, idx in enumerate(padded_batches(total, bs)):
        keep = idx >= 0
        s = int(idx[0])
        shard = shard_dir / f"{b:05d}.jsonl"
        got = _read_shard(shard, int(keep.sum()), s, n, problems) if shard.is_file() else None
        if got is not None:
            by_batch[b] = got
            done_before += 1
        elif b % n_hosts != host:
            others[b] = (shard, int(keep.sum()), s)
        else:
            mine.append((b, idx, shard))

    def write(b, idx, shard, out):
        """Grade and write batch ``b``'s shard from its real rows' outputs (NumPy)."""
        s = int(idx[0])
        token_conf = token_confidence(out.topk_logprobs) if sampling.confidence_topk else None
        new = _shard_rows(backbone, task, problems, n, out.tokens, s, _confidences(backbone, out, sampling), token_conf)
        cands.write_candidates(shard, new)
        by_batch[b] = new
        if progress:
            k = len(by_batch) - done_before
            per = (time.time() - t0) / max(k, 1)
            print(f"\rsampling {split}: shard {b + 1}/{n_batches} ({per:.1f} s/shard this run)", end="",
                  file=sys.stderr, flush=True)
        if delay:
            time.sleep(delay)

    if mine:
        ids, mask = backbone.encode_prompts([m for m in messages for _ in range(n)], width)
    if mine and sampling.refill_every is None:
        groups = math.gcd(n, bs)  # a batch's rows come in runs of identical prompts: prefill each run once
        for b, idx, shard in mine:
            keep = idx >= 0
            out = generate(backbone.model, take(ids, idx), take(mask, idx), key=jax.random.fold_in(base, b),
                           cfg=scfg, prompt_groups=groups)
            write(b, idx, shard, _rows_of(jax.device_get(out), keep))
    elif mine:
        rows = np.concatenate([idx[idx >= 0] for _, idx, _ in mine])
        where = {int(r): j for j, r in enumerate(rows)}   # row -> its place in the stream
        left = {b: int((idx >= 0).sum()) for b, idx, _ in mine}
        batch_of = {int(r): (b, idx, shard) for b, idx, shard in mine for r in idx[idx >= 0]}

        def finished(done_rows, out):
            for j in done_rows:
                b, idx, shard = batch_of[int(rows[j])]
                left[b] -= 1
                if not left[b]:
                    write(b, idx, shard, _rows_of(out, np.asarray([where[int(r)] for r in idx[idx >= 0]])))

        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.int32))
        stats: dict = {}
        t1 = time.time()
        got = stream_generate(backbone.model, ids[rows], mask[rows], row_keys=keys, cfg=scfg, slots=bs,
                              segment=sampling.refill_every, on_finished=finished, stats=stats)
        dt = time.time() - t1
        log(f"continuous batching: {len(rows)} rows, {int(got.lengths.sum())} tokens in {dt:.0f}s "
            f"({got.lengths.sum() / max(dt, 1e-9):.1f} tokens/s), {stats['steps']} steps x {stats['slots']} slots "
            f"({100 * stats['live_fraction']:.0f}% of row-steps live)")
    if progress and done_before < n_batches:
        print(file=sys.stderr)
    wait_s = float(os.environ.get("SWIFTJAX_SHARD_WAIT", "") or 7 * 86400)
    if host != 0:  # process 0 assembles the set; the others read it once written
        def final():
            ok = path.is_file() and kp.is_file() and kp.read_text(encoding="utf-8") == key_text
            return cands.read_candidates(path) if ok else None

        rows = _wait_for(final, f"process 0 to write {path}", wait_s)
        log(f"candidates (written by process 0): {path}")
        return rows, path
    for b, (shard, expect, s) in sorted(others.items()):
        by_batch[b] = _wait_for(lambda: _read_shard(shard, expect, s, n, problems) if shard.is_file() else None,
                                f"shard {shard} from process {b % n_hosts}", wait_s)
    rows = [r for b in sorted(by_batch) for r in by_batch[b]]
    cands.write_candidates(path, rows)
    with atomic_file(kp, "w", encoding="utf-8") as f:
        f.write(key_text)
    for f in shard_dir.glob("*.jsonl"):  # the set is whole: its shards are no longer needed
        f.unlink()
    shard_dir.rmdir()
    here = n_batches - done_before - len(others)
    log(f"sampled {len(rows)} {split} candidates ({here} of {n_batches} batches now"
        + (f" here, {len(others)} by other hosts" if others else "") + f") in {time.time() - t0:.0f}s -> {path}")
    return rows, path
