"""Continuous batching: rows through a few slots decode what the lock-step sampler and a
teacher-forced replay say they must, whatever the slots and segment length."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swiftjax
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.stream import stream_generate
from hf_tiny import tiny_hf_model
from test_sampling import _np_filter

EOS = (3, 7, 11, 19, 23, 31)  # several end tokens: rows end at different steps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_hf_model("llama", seed=5).save_pretrained(d)
    return swiftjax.load_model(d)[0]


def _rows(r=9, w=6, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, 97, (r, w))
    mask = np.ones((r, w), np.int64)
    for i in range(r):
        mask[i, : rs.randint(0, 4)] = 0
    ids[mask == 0] = 0
    ids[3], mask[3] = ids[2], mask[2]  # a shared prompt (prefilled once)
    ids[4], mask[4] = ids[2], mask[2]
    return ids, mask


def test_greedy_rows_equal_the_lock_step_sampler(model):
    ids, mask = _rows()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, eos_ids=EOS)
    ref = generate(model, ids, mask, cfg=cfg)
    assert len(set(np.asarray(ref.lengths).tolist())) > 2  # rows end at different steps
    for slots, segment in [(9, 32), (3, 2), (1, 5)]:  # all rows at once; refills; one row at a time
        seen, stats = [], {}
        out = stream_generate(model, ids, mask, cfg=cfg, slots=slots, segment=segment,
                              on_finished=lambda rows, o: seen.extend(rows.tolist()), stats=stats)
        assert stats["slots"] == slots and stats["live_fraction"] == out.lengths.sum() / (stats["steps"] * slots)
        assert stats["live_fraction"] <= 1.0 and (slots > 1 or stats["live_fraction"] == 1.0)
        np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens))
        np.testing.assert_array_equal(out.lengths, np.asarray(ref.lengths))
        np.testing.assert_array_equal(out.finished, np.asarray(ref.finished))
        np.testing.assert_allclose(out.logprobs, np.asarray(ref.logprobs), atol=2e-6)
        assert sorted(seen) == list(range(len(ids)))  # every row handed back once


def test_sampled_rows_replay_from_a_teacher_forced_forward(model):
    """Each row's token t is the arg-max of its filtered teacher-forced logits plus the Gumbel
    noise of ``fold_in(row_key, t)``; log-probs, top-k and mean log-prob are those logits'."""
    ids, mask = _rows(seed=1)
    n, k = 8, 3
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.8, top_p=0.9, top_k=40, eos_ids=EOS, record_topk=k)
    keys = jax.random.split(jax.random.key(4), len(ids))
    out = stream_generate(model, ids, mask, cfg=cfg, slots=3, segment=3, row_keys=keys)
    assert len(set(out.lengths.tolist())) > 1
    full_ids = np.concatenate([ids, out.tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], 1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits, np.float64)
    w = ids.shape[1]
    step_logits = logits[:, w - 1:-1]                                    # [R, N, V]
    lp = step_logits - np.log(np.exp(step_logits - step_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - step_logits.max(-1, keepdims=True)
    for r in range(len(ids)):
        length = int(out.lengths[r])
        for t in range(length):
            noise = np.asarray(jax.random.gumbel(jax.random.fold_in(keys[r], t), (lp.shape[-1],), jnp.float32))
            want = np.argmax(_np_filter(step_logits[r, t][None], cfg.temperature, cfg.top_k, cfg.top_p)[0] + noise)
            assert out.tokens[r, t] == want, (r, t)
        assert out.finished[r] == (out.tokens[r, length - 1] in EOS)
        assert out.finished[r] or length == n
        assert (out.tokens[r, length:] == cfg.pad_id).all() and (out.logprobs[r, length:] == 0).all()
        np.testing.assert_allclose(out.logprobs[r, :length],
                                   lp[r, np.arange(length), out.tokens[r, :length]], atol=2e-5)
        np.testing.assert_allclose(out.topk_logprobs[r, :length], -np.sort(-lp[r, :length], -1)[:, :k], atol=2e-5)
        np.testing.assert_allclose(out.mean_logprob[r, :length], lp[r, :length].mean(-1), atol=2e-5)
    # a row's sample does not depend on the slots it ran in nor the rows beside it
    alone = stream_generate(model, ids[5:6], mask[5:6], cfg=cfg, slots=1, segment=32, row_keys=keys[5:6])
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[5])


def test_stream_bad_inputs(model):
    ids, mask = _rows()
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="row_keys are required"):
        stream_generate(model, ids, mask, cfg=cfg, slots=2)
    with pytest.raises(ValueError, match=r"row_keys: expected one key per row, shape \(9,\)"):
        stream_generate(model, ids, mask, cfg=cfg, slots=2, row_keys=jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="row_keys: expected typed jax.random keys"):
        stream_generate(model, ids, mask, cfg=cfg, slots=2, row_keys=np.zeros((9, 2), np.uint32))
    with pytest.raises(ValueError, match="slots: expected a positive int"):
        stream_generate(model, ids, mask, cfg=cfg, slots=0, row_keys=jax.random.split(jax.random.key(0), 9))
    bad = ids.copy()
    bad[0, -1] = 10_000
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, "):
        stream_generate(model, bad, mask, cfg=cfg, slots=2, row_keys=jax.random.split(jax.random.key(0), 9))
