"""Language-model training and scoring helpers shared by the world model, ARM, IRFT/RFT and
MRPO: the response-token NLL of an NNX model, batched teacher-forced sequence log-probs, and
seeded epoch batching of equal-length arrays.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax.logprobs import token_logprobs


def response_token_logprobs(model, ids, attention_mask, response_mask):
    """Per-token log p(ids[t] | ids[<t]) [B, T-1] and the matching mask (response tokens only).

    ids / masks: [B, T]; ``response_mask[t] = 1`` marks ids[t] as a response token.
    """
    logits = model(ids, attention_mask).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:])
    return lp, response_mask[:, 1:].astype(jnp.float32)


def sft_loss(model, batch: Mapping, rng=None):
    """Mean NLL per response token; aux: token accuracy. ``batch``: ids, attention_mask, response_mask."""
    logits = model(batch["ids"], batch["attention_mask"]).logits
    lp = token_logprobs(logits[:, :-1], batch["ids"][:, 1:])
    m = batch["response_mask"][:, 1:].astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    loss = -(lp * m).sum() / n
    acc = ((jnp.argmax(logits[:, :-1], -1) == batch["ids"][:, 1:]) * m).sum() / n
    return loss, {"token_acc": acc}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _seq_logprob(graphdef, state, ids, attention_mask, response_mask):
    model = nnx.merge(graphdef, state)
    lp, m = response_token_logprobs(model, ids, attention_mask, response_mask)
    return (lp * m).sum(-1), m.sum(-1)


def sequence_logprobs(model, ids, attention_mask, response_mask, batch_size: int = 64):
    """Summed float32 response-token log-probs [N] of every row, in fixed-size jitted batches
    (the last batch is padded, so one compilation serves any N). Returns (logp [N], ntok [N])."""
    ids = np.asarray(ids)
    n = ids.shape[0]
    graphdef, state = nnx.split(model)
    out_lp, out_n = [], []
    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        pad = batch_size - (sl.stop - sl.start)
        arrs = [np.asarray(a)[sl] for a in (ids, attention_mask, response_mask)]
        if pad:
            arrs = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in arrs]
        lp, cnt = _seq_logprob(graphdef, state, *(jnp.asarray(a) for a in arrs))
        out_lp.append(np.asarray(lp)[: batch_size - pad])
        out_n.append(np.asarray(cnt)[: batch_size - pad])
    return np.concatenate(out_lp), np.concatenate(out_n)


def epoch_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, *, shuffle: bool = True,
                  drop_last: bool = True):
    """``epoch -> iterator of dict batches``: a fresh permutation per epoch from (seed, epoch),
    so a resumed run sees the same data order."""
    n = len(next(iter(arrays.values())))
    for k, v in arrays.items():
        if len(v) != n:
            raise ValueError(f"epoch_batches: array {k!r} has {len(v)} rows, expected {n}")
    if n < batch_size and drop_last:
        raise ValueError(f"epoch_batches: expected at least batch_size={batch_size} rows, got {n}")

    def batches(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s: s + batch_size]
            yield {k: jnp.asarray(v[idx]) for k, v in arrays.items()}

    batches.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    return batches
