"""Preference pairs from candidate sets, their encoding, and reference log-probs stored with them.

Pipeline (what ``swiftjax train-mrpo`` does with it)::

    rows  = read_candidates(path)                      # candidate jsonl (swiftjax.data.candidates)
    pairs = make_pairs(rows, max_per_prompt=4, seed=0)  # (correct, incorrect) of one prompt
    train, held = split_by_prompt(pairs, held_out=0.2, seed=0)
    data  = build_pair_data(tok, pairs, refs, max_len=160)  # ids/masks [N, T] + ref log-probs [K, N]
    save_pair_data(path, data); data = load_pair_data(path)

Pairs
-----
A pair is a dict ``{"prompt_id", "prompt", "chosen", "rejected", "chosen_index",
"rejected_index"}``: the prompt text and two response texts of that prompt, ``chosen`` graded
correct and ``rejected`` graded incorrect. Identical (chosen, rejected) texts occurring more
than once (duplicate candidates) count once. At most ``max_per_prompt`` pairs are kept per
prompt, drawn without replacement by a generator seeded with ``(seed, sha256(prompt_id))``, so
a prompt's pairs do not depend on which other prompts are in the file.

Encoding
--------
:func:`encode_pairs` turns pairs into right-padded ``[N, T]`` arrays with an *encode function*
``encode(tokenizer, prompts, responses, max_len) -> (ids, attention_mask, response_mask)``
(each [N, max_len] int32; ``response_mask`` marks the response tokens). The default is the
world's :func:`swiftjax.world.tokenizer.encode_examples` (chat template, response = solution +
``<|end|>``). Pairs whose chosen or rejected side needs more than ``max_len`` tokens can be
dropped (``drop_long=True``); the kept indices are returned.

References and other tokenizers
-------------------------------
A :class:`Reference` is ``(name, model, tokenizer, encode, max_len)``. Its sequence log-prob of
a (prompt, response) text pair is computed on *its own* tokenisation:
``encode(tokenizer, [prompt], [response], max_len)`` then the summed float32 log-probs of the
response tokens under ``model`` (teacher forcing, :func:`swiftjax.logprobs.sequence_logprobs`). When
the reference uses the same tokenizer and encode function as the policy (the fast path, see
:func:`same_tokenizer`), the policy's ids are reused. The log-probs are computed once, before
training, and stored with the pairs (:func:`save_pair_data`: one ``.npz`` written atomically).

Stored arrays (``build_pair_data``): ``prompt_id``, ``prompt``, ``chosen``, ``rejected`` [N]
unicode; ``chosen_index``, ``rejected_index`` [N] int64; ``chosen_ids``,
``chosen_attention_mask``, ``chosen_response_mask`` and the same for ``rejected_`` [N, T]
int32; ``ref_names`` [K] unicode; ``ref_chosen``, ``ref_rejected`` [K, N] float32 (reference k's
sequence log-prob of the chosen / rejected response).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swiftjax._io import atomic_file

from swiftjax.data import candidates as _cands
from swiftjax.world import tokenizer as wtok

__all__ = [
    "PAIR_KEYS",
    "make_pairs",
    "split_by_prompt",
    "subsample_pairs",
    "encode_pairs",
    "encode_generated",
    "through_first_divergence",
    "Reference",
    "same_tokenizer",
    "reference_logprobs",
    "pair_reference_logprobs",
    "build_pair_data",
    "take_pairs",
    "save_pair_data",
    "load_pair_data",
]

PAIR_KEYS = ("prompt_id", "prompt", "chosen", "rejected", "chosen_index", "rejected_index")
_SIDES = ("chosen", "rejected")
_ENC = ("ids", "attention_mask", "response_mask")


# ----------------------------------------------------------------------------- pairs


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _check_count(x, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x!r}")
    return int(x)


def make_pairs(rows: Iterable[Mapping], max_per_prompt: int, seed: int = 0) -> list[dict]:
    """(correct, incorrect) response pairs of the same prompt.

    Args:
      rows: candidate rows (the jsonl format of :mod:`swiftjax.data.candidates`; validated).
      max_per_prompt: keep at most this many pairs per prompt (a seeded draw without
        replacement among all distinct (correct, incorrect) text pairs of the prompt).
      seed: int; the draw for a prompt uses ``default_rng([seed, hash(prompt_id)])``.
    Returns:
      list of pair dicts (keys :data:`PAIR_KEYS`); prompts in order of first appearance, a
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


def _check_pairs(pairs: Sequence[Mapping], name: str = "pairs") -> None:
    if isinstance(pairs, (str, Mapping)):
        raise ValueError(f"{name}: expected a list of pair dicts, got {type(pairs).__name__}")
    for i, p in enumerate(pairs):
        if not isinstance(p, Mapping):
            raise ValueError(f"{name}[{i}]: expected a pair dict, got {type(p).__name__}")
        missing = [k for k in PAIR_KEYS if k not in p]
        if missing:
            raise ValueError(f"{name}[{i}]: missing keys {missing}; a pair has {list(PAIR_KEYS)}")


def split_by_prompt(pairs: Sequence[Mapping], held_out: float | int, seed: int = 0):
    """Split pairs into (train, held_out) so that no prompt is in both.

    held_out: a fraction in (0, 1) of the prompts (rounded, at least 1 when there are >= 2
      prompts) or an int number of prompts. The held-out prompts are the first ones of a
      ``default_rng(seed)`` permutation of the distinct prompt ids (sorted first, so the split
      does not depend on the pair order). Pair order is kept within each part.
    """
    _check_pairs(pairs)
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


EncodeFn = Callable[[Any, Sequence[str], Sequence[str], int], tuple]


def _encode_rows(tok, prompts, responses, max_len: int, encode: EncodeFn, drop_long: bool):
    """Encode row by row (so an over-long row can be dropped). Returns arrays, kept mask."""
    n = len(prompts)
    ids = np.zeros((n, max_len), np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    keep = np.ones((n,), bool)
    for i, (q, s) in enumerate(zip(prompts, responses)):
        try:
            a, b, c = encode(tok, [q], [s], max_len)
        except ValueError:
            if not drop_long:
                raise
            keep[i] = False
            continue
        ids[i], attn[i], resp[i] = np.asarray(a)[0], np.asarray(b)[0], np.asarray(c)[0]
        if not resp[i].any():
            raise ValueError(f"row {i}: the encode function gave an empty response mask")
    return {"ids": ids, "attention_mask": attn, "response_mask": resp}, keep


def encode_pairs(tok, pairs: Sequence[Mapping], max_len: int, *, encode: EncodeFn | None = None,
                 drop_long: bool = False):
    """Encode chosen and rejected sides of each pair.

    Args:
      tok: the tokenizer handed to ``encode``.
      pairs: pair dicts (:data:`PAIR_KEYS`).
      max_len: T, the padded length.
      encode: ``encode(tok, prompts, responses, max_len) -> (ids, attention_mask,
        response_mask)`` [n, T] each; default the world chat template
        (:func:`swiftjax.world.tokenizer.encode_examples`).
      drop_long: drop pairs with a side longer than ``max_len`` instead of raising.
    Returns:
      ``(arrays, kept)``: arrays ``{chosen_ids, chosen_attention_mask, chosen_response_mask,
      rejected_...}`` [N_kept, T] int32 and ``kept`` [N_kept] int64 indices into ``pairs``.
    """
    _check_pairs(pairs)
    _check_count(max_len, "max_len", 2)
    encode = encode or wtok.encode_examples
    prompts = [p["prompt"] for p in pairs]
    out, keep = {}, np.ones((len(pairs),), bool)
    encoded = {}
    for side in _SIDES:
        arrs, k = _encode_rows(tok, prompts, [p[side] for p in pairs], max_len, encode, drop_long)
        encoded[side] = arrs
        keep &= k
    kept = np.flatnonzero(keep).astype(np.int64)
    for side in _SIDES:
        for name in _ENC:
            out[f"{side}_{name}"] = encoded[side][name][kept]
    return out, kept


def encode_generated(tok, prompts: Sequence[str], responses: Sequence[Sequence[int]], max_len: int,
                     *, drop_long: bool = False):
    """Examples from generated token ids: the world prompt's ids followed by the response ids.

    Unlike :func:`encode_pairs` nothing is re-tokenised: the response is exactly what the
    model generated (``responses[i]``: ids up to and including the first end token, or the
    truncated generation if it never ended; padding removed by the caller).

    Returns:
      ``(arrays, kept)``: ``{ids, attention_mask, response_mask}`` [N_kept, max_len] int32
      (right-padded with <pad>) and the kept indices (all, unless ``drop_long`` dropped rows
      longer than ``max_len``).
    """
    _check_count(max_len, "max_len", 2)
    if len(prompts) != len(responses):
        raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
    n = len(prompts)
    ids = np.full((n, max_len), wtok.PAD_ID, np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    keep = np.ones((n,), bool)
    for i, (q, r) in enumerate(zip(prompts, responses)):
        r = [int(t) for t in r]
        if not r:
            raise ValueError(f"responses[{i}]: expected at least one generated token, got none")
        p = wtok.encode(tok, wtok.format_prompt(q))
        row = p + r
        if len(row) > max_len:
            if drop_long:
                keep[i] = False
                continue
            raise ValueError(f"row {i}: expected at most max_len={max_len} tokens, got {len(row)}")
        ids[i, : len(row)] = row
        attn[i, : len(row)] = 1
        resp[i, len(p): len(row)] = 1
    kept = np.flatnonzero(keep).astype(np.int64)
    return {"ids": ids[kept], "attention_mask": attn[kept], "response_mask": resp[kept]}, kept


def through_first_divergence(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]):
    """Response masks of two aligned examples cut after their first differing response token.

    ``a`` and ``b`` hold ``ids`` and ``response_mask`` [N, T] of the same prompts (so each row's
    response starts at the same position in both), as :func:`encode_generated` lays them out.
    Row i keeps its response tokens up to and including position d_i, the first response
    position where the two differ (a different token, or one response already ended). The
    shared prefix contributes identically to both sides of a pairwise margin, so a loss on
    the cut masks contrasts the single token where the two responses part, and none of the
    tokens that follow it. Rows whose responses are identical raise ValueError.

    Returns ``(mask_a, mask_b)`` int32 [N, T].
    """
    ids_a, ids_b = np.asarray(a["ids"]), np.asarray(b["ids"])
    ma, mb = np.asarray(a["response_mask"]).astype(bool), np.asarray(b["response_mask"]).astype(bool)
    if not (ids_a.shape == ids_b.shape == ma.shape == mb.shape) or ids_a.ndim != 2:
        raise ValueError(f"ids/response_mask: expected four [N, T] arrays of one shape, got "
                         f"{[x.shape for x in (ids_a, ma, ids_b, mb)]}")
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
    d = differ.argmax(axis=1)[:, None]
    keep = pos <= d
    return (ma & keep).astype(np.int32), (mb & keep).astype(np.int32)


# ----------------------------------------------------------------------------- references


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference model with its own tokenizer.

    name: a label (stored in ``ref_names``). model: an NNX causal LM (``model(ids, mask).logits``).
    tokenizer: what ``encode`` takes. encode: ``encode(tokenizer, prompts, responses,
    max_len) -> (ids, attention_mask, response_mask)`` [n, max_len]; default the world chat
    template. max_len: this reference's padded length (None: the caller's).
    """

    name: str
    model: Any
    tokenizer: Any
    encode: EncodeFn | None = None
    max_len: int | None = None

    def encode_fn(self) -> EncodeFn:
        return self.encode or wtok.encode_examples


def _tok_repr(tok) -> str | None:
    if hasattr(tok, "to_str"):  # tokenizers.Tokenizer
        return tok.to_str()
    inner = getattr(tok, "backend_tokenizer", None)  # transformers fast tokenizer
    if inner is not None and hasattr(inner, "to_str"):
        return inner.to_str()
    return None


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers are the same object or serialise to the same JSON."""
    if a is b:
        return True
    ra, rb = _tok_repr(a), _tok_repr(b)
    return ra is not None and ra == rb


def reference_logprobs(ref: Reference, prompts: Sequence[str], responses: Sequence[str], *,
                       max_len: int | None = None, batch_size: int = 64, shared=None) -> np.ndarray:
    """[N] float32 summed response-token log-probs of each (prompt, response) under ``ref``.

    The texts are encoded with the reference's own tokenizer and encode function, unless
    ``shared = (ids, attention_mask, response_mask)`` is given: those arrays (already encoded
    with the same tokenizer and encode function) are then used as they are.
    """
    from swiftjax.logprobs import sequence_logprobs

    if not isinstance(ref, Reference):
        raise ValueError(f"ref: expected a prefs.Reference, got {type(ref).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
    if shared is None:
        T = ref.max_len or max_len
        if T is None:
            raise ValueError(f"reference {ref.name!r}: expected max_len (on the Reference or as an argument)")
        arrs, _ = _encode_rows(ref.tokenizer, list(prompts), list(responses), T, ref.encode_fn(), False)
        shared = (arrs["ids"], arrs["attention_mask"], arrs["response_mask"])
    ids, attn, resp = (np.asarray(a) for a in shared)
    if ids.shape[0] != len(prompts):
        raise ValueError(f"shared: expected {len(prompts)} rows, got {ids.shape[0]}")
    vocab = ref.model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"reference {ref.name!r}: token ids outside its vocabulary of {vocab} "
                         f"(min {ids.min()}, max {ids.max()}): a tokenizer mismatch")
    if len(prompts) == 0:
        return np.zeros((0,), np.float32)
    lp, _ = sequence_logprobs(ref.model, ids, attn, resp, batch_size=batch_size)
    return np.asarray(lp, np.float32)


def pair_reference_logprobs(refs: Sequence[Reference], pairs: Sequence[Mapping], encoded: Mapping,
                            policy_tok, *, policy_encode: EncodeFn | None = None,
                            max_len: int | None = None, batch_size: int = 64):
    """Reference log-probs of both sides of every pair.

    Args:
      refs: K references (index 0 = the primary one, by convention the policy's init).
      pairs: the N pairs (after any dropping) that ``encoded`` holds, in the same order.
      encoded: the policy-side arrays from :func:`encode_pairs` (reused by references that
        share ``policy_tok`` and ``policy_encode``: the fast path).
      policy_tok, policy_encode: the tokenizer / encode function ``encoded`` was made with.
    Returns:
      ``(ref_chosen, ref_rejected)``, each [K, N] float32.
    """
    _check_pairs(pairs)
    if not refs:
        raise ValueError("refs: expected at least one reference, got none")
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise ValueError(f"refs: expected distinct names, got {names}")
    policy_encode = policy_encode or wtok.encode_examples
    N = len(pairs)
    prompts = [p["prompt"] for p in pairs]
    out = {s: np.zeros((len(refs), N), np.float32) for s in _SIDES}
    for k, ref in enumerate(refs):
        fast = same_tokenizer(ref.tokenizer, policy_tok) and ref.encode_fn() is policy_encode \
            and (ref.max_len is None or ref.max_len == encoded["chosen_ids"].shape[1])
        for side in _SIDES:
            shared = tuple(encoded[f"{side}_{n}"] for n in _ENC) if fast else None
            out[side][k] = reference_logprobs(ref, prompts, [p[side] for p in pairs], max_len=max_len,
                                              batch_size=batch_size, shared=shared)
    return out["chosen"], out["rejected"]


def build_pair_data(tok, pairs: Sequence[Mapping], refs: Sequence[Reference], max_len: int, *,
                    encode: EncodeFn | None = None, drop_long: bool = True,
                    batch_size: int = 64) -> dict[str, np.ndarray]:
    """Encode pairs with the policy tokenizer and add every reference's log-probs.

    Returns the dict of arrays described in the module docstring (pairs too long for
    ``max_len`` are dropped when ``drop_long``)."""
    encoded, kept = encode_pairs(tok, pairs, max_len, encode=encode, drop_long=drop_long)
    pairs = [pairs[i] for i in kept]
    ref_w, ref_l = pair_reference_logprobs(refs, pairs, encoded, tok, policy_encode=encode,
                                           max_len=max_len, batch_size=batch_size)
    data = {
        "prompt_id": np.array([p["prompt_id"] for p in pairs], dtype=np.str_),
        "prompt": np.array([p["prompt"] for p in pairs], dtype=np.str_),
        "chosen": np.array([p["chosen"] for p in pairs], dtype=np.str_),
        "rejected": np.array([p["rejected"] for p in pairs], dtype=np.str_),
        "chosen_index": np.array([p["chosen_index"] for p in pairs], dtype=np.int64),
        "rejected_index": np.array([p["rejected_index"] for p in pairs], dtype=np.int64),
        **encoded,
        "ref_names": np.array([r.name for r in refs], dtype=np.str_),
        "ref_chosen": ref_w,
        "ref_rejected": ref_l,
    }
    return data


def take_pairs(data: Mapping[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The rows ``index`` of stored pair data (every per-pair array; ``ref_*`` along axis 1)."""
    index = np.asarray(index)
    out = {}
    for k, v in data.items():
        if k == "ref_names":
            out[k] = v
        elif k.startswith("ref_"):
            out[k] = v[:, index]
        else:
            out[k] = v[index]
    return out


def save_pair_data(path, data: Mapping[str, np.ndarray]) -> Path:
    """Write ``data`` with ``np.savez`` atomically (a temp file in the same folder, then
    ``os.replace``); object arrays are refused (the file must load without pickle)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path: expected a .npz file name, got {path}")
    for k, v in data.items():
        if np.asarray(v).dtype == object:
            raise ValueError(f"data[{k!r}]: expected a numeric or unicode array, got dtype object")
    with atomic_file(path, "wb", suffix=".npz") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in data.items()})
    return path


def load_pair_data(path) -> dict[str, np.ndarray]:
    """The arrays :func:`save_pair_data` wrote (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected a pair-data .npz file, {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
