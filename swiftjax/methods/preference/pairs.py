"""Preference pairs: the one encoded pair type, how candidates become pairs, and reference
log-probs stored with them.

Pipeline (what ``swiftjax preference mrpo`` does with it)::

    rows    = candidate_set(policy, task, "train", ...)       # or read_candidates(path)
    records = make_pairs(rows, max_per_prompt=4, seed=0)       # (correct, incorrect) of one prompt
    pairs, kept = encode_pairs(policy, prompts, chosen, rejected)   # PreferencePairs, K = 0
    lw, ll  = reference_logprobs(ref, policy, pairs, prompts, chosen_texts, rejected_texts)
    pairs   = pairs.with_refs(["other"], lw[:, None], ll[:, None])
    save_pairs(path, pairs, extra); pairs, extra = load_pairs(path)

Pair records
------------
:func:`make_pairs` selects which two candidates of a prompt form a pair: a *record* is a dict
``{"prompt_id", "prompt", "chosen", "rejected", "chosen_index", "rejected_index"}`` (texts and
candidate indices, ``chosen`` graded correct and ``rejected`` incorrect). Identical (chosen,
rejected) texts occurring more than once count once. At most ``max_per_prompt`` pairs are kept
per prompt, drawn without replacement by a generator seeded with ``(seed, sha256(prompt_id))``,
so a prompt's pairs do not depend on which other prompts are in the file. Records say *which*
responses; everything that trains or scores uses the encoded type below.

The pair type: :class:`PreferencePairs`
---------------------------------------
N pairs encoded for one model (a :class:`swiftjax.backbone.Backbone`), every array's first axis
the pair:

* ``chosen_ids``, ``chosen_attention_mask``, ``chosen_response_mask`` [N, T] int32, and the same
  three for ``rejected_``. Layout (:meth:`Backbone.encode_pairs`): **right padding**; row i holds
  the rendered generation prompt at positions ``[0, P_i)``, then the response (up to and
  including its end-of-turn id) at ``[P_i, P_i + R_i)``, then the backbone's ``pad_id``. The
  attention mask is 1 over prompt and response, the response mask 1 over the response only;
  both are 0 on padding. The two sides of a row share the prompt, so its response starts at the
  same position in both. IRFT / RFT use chosen = the demonstration, rejected = a generation.
* ``ref_chosen``, ``ref_rejected`` [N, K] float32: stored reference sequence log-probs (sums over
  the response tokens under teacher forcing, :func:`swiftjax.logprobs.sequence_logprobs`), one
  column per reference named in ``ref_names`` (a tuple of K strings; K may be 0). Each reference
  scores the pair on its *own* tokenisation and template.

It is a JAX pytree (the arrays are leaves, ``ref_names`` is static), so a batch of pairs goes
into a jitted train step as it is; :func:`pair_batches` yields such batches.

Responses are given either as token ids (used as they are, e.g. what the model generated) or as
texts (encoded with :meth:`Backbone.response_ids`, the template's assistant turn). A reference
with the same tokenisation as the policy (same tokenizer, template, system message and end
ids: :func:`same_tokenisation`) reuses the policy's ids; any other encodes the texts itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax import logprobs as lm
from swiftjax._io import atomic_file
from swiftjax.backbone import Backbone
from swiftjax.batching import epoch_batches
from swiftjax.data import candidates as _cands

__all__ = [
    "PAIR_KEYS",
    "PreferencePairs",
    "make_pairs",
    "split_by_prompt",
    "subsample_pairs",
    "response_lists",
    "encode_pairs",
    "through_first_divergence",
    "pair_logprobs",
    "pair_sequence_logprobs",
    "pair_batches",
    "same_tokenisation",
    "reference_logprobs",
    "save_pairs",
    "load_pairs",
]

PAIR_KEYS = ("prompt_id", "prompt", "chosen", "rejected", "chosen_index", "rejected_index")
_SIDES = ("chosen", "rejected")
_ENC = ("ids", "attention_mask", "response_mask")
_ARRAYS = tuple(f"{s}_{e}" for s in _SIDES for e in _ENC) + ("ref_chosen", "ref_rejected")


# ----------------------------------------------------------------------------- the pair type


@dataclasses.dataclass(frozen=True)
class PreferencePairs:
    """N encoded preference pairs with K stored reference log-probs (layout: module doc)."""

    chosen_ids: Any                # [N, T] int32, right-padded with the backbone's pad id
    chosen_attention_mask: Any     # [N, T] int32: prompt + response
    chosen_response_mask: Any      # [N, T] int32: response only (end-of-turn id included)
    rejected_ids: Any              # [N, T] int32, the same layout (same prompt per row)
    rejected_attention_mask: Any   # [N, T] int32
    rejected_response_mask: Any    # [N, T] int32
    ref_chosen: Any                # [N, K] float32 sequence log-prob of chosen under reference k
    ref_rejected: Any              # [N, K] float32
    ref_names: tuple[str, ...] = ()

    # -- construction and checks

    @classmethod
    def build(cls, chosen: Sequence, rejected: Sequence, ref_chosen=None, ref_rejected=None,
              ref_names: Sequence[str] = ()) -> "PreferencePairs":
        """From ``(ids, attention_mask, response_mask)`` per side (numpy, [N, T] each);
        without references the ref arrays are [N, 0]. Checked."""
        n = len(chosen[0])
        k = len(ref_names)
        z = np.zeros((n, 0), np.float32)
        out = cls(*(np.asarray(a, np.int32) for a in (*chosen, *rejected)),
                  z if ref_chosen is None else np.asarray(ref_chosen, np.float32),
                  z if ref_rejected is None else np.asarray(ref_rejected, np.float32),
                  tuple(str(r) for r in ref_names))
        if k == 0 and (ref_chosen is not None or ref_rejected is not None):
            raise ValueError("ref_names: expected one name per reference column, got none")
        return out.check()

    def check(self) -> "PreferencePairs":
        """Raise ValueError unless the arrays have the documented shapes (host arrays)."""
        ids = np.asarray(self.chosen_ids)
        if ids.ndim != 2:
            raise ValueError(f"chosen_ids: expected [N, T], got shape {ids.shape}")
        n, t = ids.shape
        for name in _ARRAYS[:6]:
            a = np.asarray(getattr(self, name))
            if a.shape != (n, t):
                raise ValueError(f"{name}: expected shape [N, T]=({n}, {t}) like chosen_ids, got {a.shape}")
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name}: expected int32, got {a.dtype}")
        k = len(self.ref_names)
        if len(set(self.ref_names)) != k:
            raise ValueError(f"ref_names: expected distinct names, got {list(self.ref_names)}")
        for name in ("ref_chosen", "ref_rejected"):
            a = np.asarray(getattr(self, name))
            if a.shape != (n, k):
                raise ValueError(f"{name}: expected shape [N, K]=({n}, {k}) (K = len(ref_names)), got {a.shape}")
            if k and not np.all(np.isfinite(a)):
                raise ValueError(f"{name}: expected finite log-probs")
        for side in _SIDES:
            r = np.asarray(getattr(self, f"{side}_response_mask"))
            a = np.asarray(getattr(self, f"{side}_attention_mask"))
            if np.any((r != 0) & (a == 0)):
                raise ValueError(f"{side}_response_mask: expected response tokens inside the attention mask")
            if n and np.any(r[:, 0] != 0):
                raise ValueError(f"{side}_response_mask: expected 0 at position 0 (a prompt comes first)")
        return self

    # -- views

    def __len__(self) -> int:
        return int(np.shape(self.chosen_ids)[0])

    @property
    def max_len(self) -> int:
        return int(np.shape(self.chosen_ids)[1])

    def arrays(self) -> dict[str, Any]:
        """The array fields by name (what :func:`epoch_batches` and ``np.savez`` take)."""
        return {k: getattr(self, k) for k in _ARRAYS}

    def side(self, which: str):
        """``(ids, attention_mask, response_mask)`` of ``'chosen'`` or ``'rejected'``."""
        if which not in _SIDES:
            raise ValueError(f"side: expected 'chosen' or 'rejected', got {which!r}")
        return tuple(getattr(self, f"{which}_{e}") for e in _ENC)

    def take(self, index) -> "PreferencePairs":
        """Rows ``index`` (host numpy)."""
        index = np.asarray(index, np.int64)
        return dataclasses.replace(self, **{k: np.asarray(v)[index] for k, v in self.arrays().items()})

    def with_refs(self, names: Sequence[str], ref_chosen, ref_rejected) -> "PreferencePairs":
        """These pairs with reference columns [N, k] appended (named ``names``)."""
        rc, rr = np.asarray(ref_chosen, np.float32), np.asarray(ref_rejected, np.float32)
        if rc.shape != (len(self), len(names)) or rr.shape != rc.shape:
            raise ValueError(f"ref log-probs: expected [N, k]=({len(self)}, {len(names)}), got {rc.shape}, {rr.shape}")
        return dataclasses.replace(
            self, ref_chosen=np.concatenate([np.asarray(self.ref_chosen, np.float32), rc], 1),
            ref_rejected=np.concatenate([np.asarray(self.ref_rejected, np.float32), rr], 1),
            ref_names=tuple(self.ref_names) + tuple(names)).check()

    def select_refs(self, index: Sequence[int]) -> "PreferencePairs":
        """Only the reference columns ``index`` (in that order)."""
        index = [int(i) for i in index]
        return dataclasses.replace(self, ref_chosen=np.asarray(self.ref_chosen)[:, index],
                                   ref_rejected=np.asarray(self.ref_rejected)[:, index],
                                   ref_names=tuple(self.ref_names[i] for i in index))


jax.tree_util.register_dataclass(PreferencePairs, data_fields=list(_ARRAYS), meta_fields=["ref_names"])


# ----------------------------------------------------------------------------- pair records


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _check_count(x, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x!r}")
    return int(x)


def make_pairs(rows: Iterable[Mapping], max_per_prompt: int, seed: int = 0) -> list[dict]:
    """(correct, incorrect) response pair records of the same prompt.

    Args:
      rows: candidate rows (the jsonl format of :mod:`swiftjax.data.candidates`; validated).
      max_per_prompt: keep at most this many pairs per prompt (a seeded draw without
        replacement among all distinct (correct, incorrect) text pairs of the prompt).
      seed: int; the draw for a prompt uses ``default_rng([seed, hash(prompt_id)])``.
    Returns:
      list of records (keys :data:`PAIR_KEYS`); prompts in order of first appearance, a
      prompt's pairs ordered by (chosen_index, rejected_index). Prompts whose candidates are
      all correct or all incorrect give no pair.
    """
    m = _check_count(max_per_prompt, "max_per_prompt")
    _check_count(seed, "seed", 0)
    by_prompt: dict[str, list[Mapping]] = {}
    prompt_text: dict[str, str] = {}
    for i, row in enumerate(rows):
        _cands.validate_row(row, f"row {i}")
        pid = row["prompt_id"]
        if pid in prompt_text and prompt_text[pid] != row["prompt"]:
            raise ValueError(f"row {i}: prompt {pid!r} has two different prompt texts")
        prompt_text[pid] = row["prompt"]
        by_prompt.setdefault(pid, []).append(row)
    out: list[dict] = []
    for pid, group in by_prompt.items():
        group = sorted(group, key=lambda r: r["index"])
        good = [r for r in group if r["correct"]]
        bad = [r for r in group if not r["correct"]]
        seen: set[tuple[str, str]] = set()
        cand = []
        for g in good:
            for b in bad:
                key = (g["text"], b["text"])
                if key in seen:
                    continue
                seen.add(key)
                cand.append((g, b))
        if not cand:
            continue
        if len(cand) > m:
            rng = np.random.default_rng([int(seed), _stable_int(pid)])
            pick = np.sort(rng.choice(len(cand), size=m, replace=False))
            cand = [cand[j] for j in pick]
        for g, b in cand:
            out.append({"prompt_id": pid, "prompt": prompt_text[pid], "chosen": g["text"],
                        "rejected": b["text"], "chosen_index": int(g["index"]),
                        "rejected_index": int(b["index"])})
    return out


def _check_records(pairs: Sequence[Mapping], name: str = "pairs") -> None:
    if isinstance(pairs, (str, Mapping)):
        raise ValueError(f"{name}: expected a list of pair records, got {type(pairs).__name__}")
    for i, p in enumerate(pairs):
        if not isinstance(p, Mapping):
            raise ValueError(f"{name}[{i}]: expected a pair record, got {type(p).__name__}")
        missing = [k for k in PAIR_KEYS if k not in p]
        if missing:
            raise ValueError(f"{name}[{i}]: missing keys {missing}; a pair has {list(PAIR_KEYS)}")


def split_by_prompt(pairs: Sequence[Mapping], held_out: float | int, seed: int = 0):
    """Split pair records into (train, held_out) so that no prompt is in both.

    held_out: a fraction in (0, 1) of the prompts (rounded, at least 1 when there are >= 2
      prompts) or an int number of prompts. The held-out prompts are the first ones of a
      ``default_rng(seed)`` permutation of the distinct prompt ids (sorted first, so the split
      does not depend on the pair order). Pair order is kept within each part.
    """
    _check_records(pairs)
    ids = sorted({p["prompt_id"] for p in pairs})
    P = len(ids)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float, np.integer, np.floating)):
        raise ValueError(f"held_out: expected a fraction in (0, 1) or an int count, got {held_out!r}")
    if isinstance(held_out, (int, np.integer)):
        k = int(held_out)
        if not 0 <= k <= P:
            raise ValueError(f"held_out: expected a prompt count in [0, {P}], got {k}")
    else:
        if not 0.0 < float(held_out) < 1.0:
            raise ValueError(f"held_out: expected a fraction in (0, 1), got {held_out}")
        k = int(round(float(held_out) * P))
        if P >= 2:
            k = min(max(k, 1), P - 1)
    order = np.random.default_rng(int(seed)).permutation(P)
    held = {ids[j] for j in order[:k]}
    return ([p for p in pairs if p["prompt_id"] not in held],
            [p for p in pairs if p["prompt_id"] in held])


def subsample_pairs(n_pairs: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` of ``n_pairs`` pairs: the first n of a ``default_rng(seed)``
    permutation, sorted, so a smaller subset is always inside a larger one."""
    _check_count(n_pairs, "n_pairs", 0)
    _check_count(n, "n", 1)
    if n > n_pairs:
        raise ValueError(f"n: expected at most the {n_pairs} available pairs, got {n}")
    return np.sort(np.random.default_rng(int(seed)).permutation(n_pairs)[:n])


# ----------------------------------------------------------------------------- encoding


def response_lists(backbone: Backbone, prompts: Sequence[str], responses: Sequence) -> list[list[int]]:
    """Response ids per prompt: a text becomes the template's assistant turn
    (:meth:`Backbone.response_ids`), a sequence of ints is used as it is."""
    if len(prompts) != len(responses):
        raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
    out = []
    for i, (q, r) in enumerate(zip(prompts, responses)):
        ids = backbone.response_ids(q, r) if isinstance(r, str) else [int(t) for t in r]
        if not ids:
            raise ValueError(f"responses[{i}]: expected at least one response token, got none")
        out.append(ids)
    return out


def _round16(n: int) -> int:
    return -(-int(n) // 16) * 16


def encode_pairs(backbone: Backbone, prompts: Sequence[str], chosen: Sequence, rejected: Sequence,
                 max_len: int | None = None, *, drop_long: bool = False):
    """Encode pairs for ``backbone`` (no references yet: K = 0).

    Args:
      prompts: the user messages (what :meth:`Backbone.prompt_ids` renders).
      chosen, rejected: per pair a response text or a list of response ids (:func:`response_lists`).
      max_len: T (null: the longest pair rounded up to a multiple of 16).
      drop_long: drop pairs with a side longer than ``max_len`` instead of raising.
    Returns:
      ``(PreferencePairs, kept)``: ``kept`` [N_kept] int64 indices of the encoded pairs.
    """
    c = response_lists(backbone, prompts, chosen)
    r = response_lists(backbone, prompts, rejected)
    plen: dict[str, int] = {}
    need = []
    for q, a, b in zip(prompts, c, r):
        if q not in plen:
            plen[q] = len(backbone.prompt_ids(q))
        need.append(plen[q] + max(len(a), len(b)))
    need = np.asarray(need, np.int64)
    if max_len is None:
        T = _round16(max(int(need.max()) if need.size else 2, 2))
    else:
        T = _check_count(max_len, "max_len", 2)
    long = need > T
    if long.any() and not drop_long:
        i = int(np.flatnonzero(long)[0])
        raise ValueError(f"pair {i}: needs {int(need[i])} tokens, more than max_len={T}")
    kept = np.flatnonzero(~long).astype(np.int64)
    qs = [prompts[i] for i in kept]
    sides = [backbone.encode_pairs(qs, [resp[i] for i in kept], T) for resp in (c, r)]
    return PreferencePairs.build(sides[0], sides[1]), kept


def through_first_divergence(pairs: PreferencePairs) -> PreferencePairs:
    """The pairs with both response masks cut after the first differing response token.

    Row i keeps its response tokens up to and including position d_i, the first response
    position where the two sides differ (a different token, or one response already ended).
    The shared prefix contributes identically to both sides of a pairwise margin, so a loss on
    the cut masks contrasts the single token where the two responses part, and none of the
    tokens that follow it. Rows whose responses are identical raise ValueError.
    """
    ids_a, ids_b = np.asarray(pairs.chosen_ids), np.asarray(pairs.rejected_ids)
    ma = np.asarray(pairs.chosen_response_mask).astype(bool)
    mb = np.asarray(pairs.rejected_response_mask).astype(bool)
    if not (ma.any(axis=1).all() and mb.any(axis=1).all()):
        raise ValueError("response_mask: expected at least one response token in every row")
    start = ma.argmax(axis=1)
    bad = np.flatnonzero(start != mb.argmax(axis=1))
    if bad.size:
        raise ValueError(f"row {bad[0]}: the two responses start at different positions "
                         f"({start[bad[0]]} vs {mb[bad[0]].argmax()}); expected the same prompt layout")
    pos = np.arange(ids_a.shape[1])[None, :]
    differ = (ma != mb) | (ma & (ids_a != ids_b))
    differ &= pos >= start[:, None]
    same = np.flatnonzero(~differ.any(axis=1))
    if same.size:
        raise ValueError(f"row {same[0]}: the two responses are identical; expected them to differ")
    keep = pos <= differ.argmax(axis=1)[:, None]
    return dataclasses.replace(pairs, chosen_response_mask=(ma & keep).astype(np.int32),
                               rejected_response_mask=(mb & keep).astype(np.int32))


# ----------------------------------------------------------------------------- log-probs


def pair_logprobs(model, pairs: PreferencePairs):
    """([B], [B]) summed response log-probs of the chosen and rejected sides under ``model``,
    from one forward of the stacked [2B, T] batch (traceable: what a train step calls)."""
    ids = jnp.concatenate([pairs.chosen_ids, pairs.rejected_ids])
    attn = jnp.concatenate([pairs.chosen_attention_mask, pairs.rejected_attention_mask])
    resp = jnp.concatenate([pairs.chosen_response_mask, pairs.rejected_response_mask])
    lp, m = lm.response_token_logprobs(model, ids, attn, resp)
    s = jnp.sum(lp * m, axis=-1)
    b = pairs.chosen_ids.shape[0]
    return s[:b], s[b:]


def pair_sequence_logprobs(model, pairs: PreferencePairs, batch_size: int = 64):
    """Host float32 ([N], [N]) sequence log-probs of both sides, in fixed-size jitted batches."""
    out = []
    for side in _SIDES:
        lp, _ = lm.sequence_logprobs(model, *pairs.side(side), batch_size=batch_size)
        out.append(np.asarray(lp, np.float32))
    return out[0], out[1]


def pair_batches(pairs: PreferencePairs, batch_size: int, seed: int):
    """``epoch -> iterator of PreferencePairs`` batches of ``batch_size`` rows (a fresh seeded
    permutation per epoch, :func:`swiftjax.batching.epoch_batches`); ``.steps_per_epoch``."""
    inner = epoch_batches(pairs.arrays(), batch_size, seed)

    def batches(epoch: int):
        for b in inner(epoch):
            yield PreferencePairs(**b, ref_names=pairs.ref_names)

    batches.steps_per_epoch = inner.steps_per_epoch
    return batches


# ----------------------------------------------------------------------------- references


def _tokenisation(b: Backbone) -> tuple:
    return (b.tokenizer.to_str(), b.template, b.system, tuple(b.eos_ids), b.bos_token)


def same_tokenisation(a: Backbone, b: Backbone) -> bool:
    """True when two backbones turn (prompt, response) texts into the same ids: the same
    tokenizer, template, system message and end-of-turn ids."""
    return a is b or _tokenisation(a) == _tokenisation(b)


def reference_logprobs(ref: Backbone, policy: Backbone, pairs: PreferencePairs, prompts: Sequence[str],
                       chosen: Sequence[str], rejected: Sequence[str], *, batch_size: int = 64):
    """Host float32 ([N], [N]) sequence log-probs of both sides of ``pairs`` under ``ref``.

    ``pairs`` were encoded for ``policy`` from ``prompts`` and responses whose texts are
    ``chosen`` / ``rejected``. When ``ref`` tokenises like ``policy`` (:func:`same_tokenisation`)
    its log-probs are those of the policy's ids; otherwise the texts are encoded with the
    reference's own tokenizer and template (:func:`encode_pairs`) and scored there.
    """
    n = len(pairs)
    if not (len(prompts) == len(chosen) == len(rejected) == n):
        raise ValueError(f"prompts / chosen / rejected: expected {n} each (one per pair), got "
                         f"{len(prompts)}, {len(chosen)}, {len(rejected)}")
    if n == 0:
        return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    if not same_tokenisation(ref, policy):
        bad = [i for i, t in enumerate(list(chosen) + list(rejected)) if not isinstance(t, str)]
        if bad:
            raise ValueError("reference on another tokenisation: expected response texts, got ids")
        pairs, _ = encode_pairs(ref, prompts, chosen, rejected)
    vocab = int(ref.config.vocab_size)
    for side in _SIDES:
        ids = np.asarray(getattr(pairs, f"{side}_ids"))
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"reference {ref.path}: token ids outside its vocabulary of {vocab} "
                             f"(min {ids.min()}, max {ids.max()}): a tokenizer mismatch")
    return pair_sequence_logprobs(ref.model, pairs, batch_size)


# ----------------------------------------------------------------------------- storage


def save_pairs(path, pairs: PreferencePairs, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the pairs (and ``extra`` per-pair or scalar arrays: records, flags, a meta string)
    as one ``.npz``, atomically; object arrays are refused (the file loads without pickle)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path: expected a .npz file name, got {path}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & (set(_ARRAYS) | {"ref_names"}))
    if clash:
        raise ValueError(f"extra: keys {clash} are the pairs' own fields")
    data = {**{k: np.asarray(v) for k, v in pairs.arrays().items()},
            "ref_names": np.array(list(pairs.ref_names), dtype=np.str_),
            **{k: np.asarray(v) for k, v in extra.items()}}
    for k, v in data.items():
        if v.dtype == object:
            raise ValueError(f"data[{k!r}]: expected a numeric or unicode array, got dtype object")
    with atomic_file(path, "wb", suffix=".npz") as f:
        np.savez(f, **data)
    return path


def load_pairs(path) -> tuple[PreferencePairs, dict[str, np.ndarray]]:
    """``(pairs, extra)`` as :func:`save_pairs` wrote them (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected a pair-data .npz file, {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    missing = [k for k in (*_ARRAYS, "ref_names") if k not in data]
    if missing:
        raise ValueError(f"{path}: not a pair file (missing {missing})")
    pairs = PreferencePairs(**{k: data.pop(k) for k in _ARRAYS},
                            ref_names=tuple(str(x) for x in data.pop("ref_names").tolist())).check()
    return pairs, data
