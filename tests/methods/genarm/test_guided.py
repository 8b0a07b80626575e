"""GenARM guided decoding and the ARGS baseline against numpy references of their formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swiftjax.methods.genarm import guided as arm_decode
from swiftjax import sampling as decode
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.models.config import ModelConfig
from swiftjax.models.registry import create_model

N = 8
SAMPLE = SamplingConfig(max_new_tokens=N, temperature=1.0)
GREEDY = SamplingConfig(max_new_tokens=N, temperature=0)
BASE = ModelConfig(model_type="llama", vocab_size=41, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=128)


@pytest.fixture(scope="module")
def models():
    base = create_model(BASE, seed=0)
    # ARMs: same vocabulary; a longer vocabulary; weak-to-strong (half depth, other width)
    arm_a = create_model(BASE, seed=1)
    arm_b = create_model(BASE.replace(vocab_size=47), seed=2)
    weak = create_model(BASE.replace(num_layers=1, hidden_size=16, head_dim=4, intermediate_size=24), seed=3)
    for m in (base, arm_a, arm_b, weak):  # sharper distributions than the 0.02 init
        emb = m.model.embed_tokens.weight
        emb[...] = emb[...] * 40.0
    return base, arm_a, arm_b, weak


def _prompt(b=3, t=6, seed=0, vocab=41):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(b, t))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask).logits


def _teacher_forced(model, ids, mask, tokens):
    """Next-token log-probs [B, N, V] after prompt + tokens[:, :j] for j = 0..N-1 (one
    uncached forward over the whole sequence)."""
    full = np.concatenate([ids, tokens], 1)
    fmask = np.concatenate([mask, np.ones_like(tokens)], 1)
    logits = np.asarray(_forward(*nnx.split(model), jnp.asarray(full), jnp.asarray(fmask)))
    t = ids.shape[1]
    return _log_softmax(logits[:, t - 1:-1])


def _guided_ref(base, arms, alphas, ids, mask, tokens, arm_prompts=None):
    """numpy s = log_softmax(base) + sum_i alpha_i log_softmax(arm_i)[:V] along the sampled path."""
    s = _teacher_forced(base, ids, mask, tokens)
    v = s.shape[-1]
    for i, (a, m) in enumerate(zip(alphas, arms)):
        pi, pm = (ids, mask) if arm_prompts is None or arm_prompts[i] is None else arm_prompts[i]
        s = s + a * _teacher_forced(m, pi, pm, tokens)[..., :v]
    return s


def test_alpha_zero_reproduces_plain_sampling(models):
    base, arm_a, arm_b, _ = models
    ids, mask = _prompt()
    cfg = SAMPLE
    key = jax.random.key(7)
    plain = generate(base, ids, mask, key=key, cfg=cfg)
    guided = arm_decode.guided_generate(base, [arm_a, arm_b], [0.0, 0.0], ids, mask, key=key, cfg=cfg)
    np.testing.assert_array_equal(np.asarray(guided.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(guided.logprobs), np.asarray(plain.logprobs), atol=1e-5)


def test_sampled_logprobs_follow_the_guided_formula_and_weights_never_recompile(models):
    base, arm_a, arm_b, _ = models
    ids, mask = _prompt(seed=1)
    cfg = SAMPLE
    alphas = [1.5, -0.5]
    out = arm_decode.guided_generate(base, [arm_a, arm_b], alphas, ids, mask, key=jax.random.key(3), cfg=cfg)
    toks = np.asarray(out.tokens)
    s = _guided_ref(base, [arm_a, arm_b], alphas, ids, mask, toks)
    ref = np.take_along_axis(_log_softmax(s), toks[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=5e-5)
    assert toks.max() < BASE.vocab_size
    n = decode._sample._cache_size()
    outs = [np.asarray(arm_decode.guided_generate(base, [arm_a, arm_b], a, ids, mask, key=jax.random.key(3),
                                                  cfg=cfg).tokens)
            for a in ([0.0, 4.0], [2.0, 1.0], np.array([-1.0, 0.25], np.float32))]
    assert decode._sample._cache_size() == n
    assert any((o != toks).any() for o in outs)  # the weights matter


def test_greedy_guided_is_argmax_of_formula_weak_to_strong(models):
    base, arm_a, _, weak = models
    ids, mask = _prompt(seed=2)
    cfg = SAMPLE
    alphas = [2.0, 0.7]
    out = arm_decode.guided_generate(base, [weak, arm_a], alphas, ids, mask, cfg=cfg, temperature=0.0)
    toks = np.asarray(out.tokens)
    s = _guided_ref(base, [weak, arm_a], alphas, ids, mask, toks)
    np.testing.assert_array_equal(toks, s.argmax(-1))


def test_arm_with_its_own_prompt(models):
    base, arm_a, _, _ = models
    ids, mask = _prompt(seed=3)
    # the ARM reads a different, longer template: a system prefix before the same prompt
    prefix = np.tile(np.array([[5, 9, 11, 13]]), (ids.shape[0], 1))
    arm_ids, arm_mask = [], []
    for row, m in zip(ids, mask):
        real = list(prefix[0]) + list(row[m == 1])
        pad = ids.shape[1] + 4 - len(real)
        arm_ids.append([0] * pad + real)
        arm_mask.append([0] * pad + [1] * len(real))
    arm_ids, arm_mask = np.array(arm_ids), np.array(arm_mask)
    cfg = SAMPLE
    out = arm_decode.guided_generate(base, [arm_a], [1.0], ids, mask, key=jax.random.key(0), cfg=cfg,
                                     arm_inputs=[(arm_ids, arm_mask)])
    toks = np.asarray(out.tokens)
    s = _guided_ref(base, [arm_a], [1.0], ids, mask, toks, arm_prompts=[(arm_ids, arm_mask)])
    ref = np.take_along_axis(_log_softmax(s), toks[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=5e-5)
    shared = _guided_ref(base, [arm_a], [1.0], ids, mask, toks)
    assert np.abs(np.take_along_axis(_log_softmax(shared), toks[..., None], -1)[..., 0] - ref).max() > 1e-3


def test_vocab_and_input_errors(models):
    base, arm_a, arm_b, _ = models
    ids, mask = _prompt()
    cfg = GREEDY
    small = create_model(BASE.replace(vocab_size=30), seed=4)
    with pytest.raises(ValueError, match="smaller than the base"):
        arm_decode.guided_generate(base, [small], [1.0], ids, mask, cfg=cfg)
    vb = {f"t{i}": i for i in range(41)}
    va = dict(vb)
    va["t5"], va["t6"] = 6, 5
    with pytest.raises(ValueError, match="token-id spaces differ"):
        arm_decode.guided_generate(base, [arm_a], [1.0], ids, mask, cfg=cfg, base_tokenizer=vb,
                                   arm_tokenizers=[va])
    arm_decode.guided_generate(base, [arm_a, arm_b], [1.0, 1.0], ids, mask, key=jax.random.key(0), cfg=SAMPLE,
                               base_tokenizer=vb, arm_tokenizers=[vb, {**vb, "extra": 45}])
    with pytest.raises(ValueError, match="alphas"):
        arm_decode.guided_generate(base, [arm_a], [1.0, 2.0], ids, mask, cfg=cfg)
    with pytest.raises(ValueError, match="alphas"):
        arm_decode.guided_generate(base, [arm_a], [np.nan], ids, mask, cfg=cfg)
    with pytest.raises(ValueError, match="arms"):
        arm_decode.guided_generate(base, [], [], ids, mask, cfg=cfg)
    with pytest.raises(ValueError, match="arm_inputs"):
        arm_decode.guided_generate(base, [arm_a], [1.0], ids, mask, cfg=cfg, arm_inputs=[None, None])
    with pytest.raises(ValueError, match="left padding"):
        arm_decode.guided_generate(base, [arm_a], [1.0], ids, mask, cfg=cfg,
                                   arm_inputs=[(ids, np.pad(mask[:, 1:], ((0, 0), (0, 1))))])
    with pytest.raises(ValueError, match="temperature"):
        arm_decode.guided_generate(base, [arm_a], [1.0], ids, mask, cfg=cfg, temperature=-1.0)
    with pytest.raises(ValueError, match="k"):
        arm_decode.args_generate(base, arm_a, ids, mask, k=0, cfg=cfg)
    with pytest.raises(ValueError, match="top_k"):
        arm_decode.args_generate(base, arm_a, ids, mask, k=3, cfg=SamplingConfig(max_new_tokens=2, top_k=5,
                                                                                 temperature=0))
    with pytest.raises(ValueError, match="key"):
        arm_decode.args_generate(base, arm_a, ids, mask, k=3, cfg=SamplingConfig(max_new_tokens=2))


def _torch_logits(model, ids, mask):
    import torch

    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.double().numpy()


def test_args_matches_a_transformers_reference(tmp_path):
    """Reference: transformers (PyTorch) models, no cache, unpadded growing sequences."""
    import swiftjax
    from hf_tiny import tiny_hf_model

    hf_base, hf_rm = tiny_hf_model("llama", seed=1, vocab=41), tiny_hf_model("llama", seed=2, vocab=41)
    hf_base.save_pretrained(tmp_path / "base")
    hf_rm.save_pretrained(tmp_path / "rm")
    base, _ = swiftjax.load_model(tmp_path / "base")
    rm, _ = swiftjax.load_model(tmp_path / "rm")
    ids, mask = _prompt(seed=5)
    k, w, n = 4, 0.8, N
    out = arm_decode.args_generate(base, rm, ids, mask, k=k, w=w, cfg=GREEDY)
    toks = np.asarray(out.tokens)
    b, t = ids.shape
    seq, smask = ids.copy(), mask.copy()
    for j in range(n):
        lp = _log_softmax(_torch_logits(hf_base, seq, smask)[:, -1])
        top = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
        cand = np.concatenate([np.repeat(seq, k, 0), top.reshape(-1, 1)], 1)
        cmask = np.concatenate([np.repeat(smask, k, 0), np.ones((b * k, 1), int)], 1)
        rm_lp = _log_softmax(_torch_logits(hf_rm, cand, cmask)[:, :-1])
        tok_lp = np.take_along_axis(rm_lp, cand[:, 1:, None], -1)[..., 0]
        reward = tok_lp[:, t - 1:].sum(-1).reshape(b, k)  # response so far + candidate
        score = np.take_along_axis(lp, top, -1) + w * reward
        choice = top[np.arange(b), score.argmax(-1)]
        np.testing.assert_array_equal(toks[:, j], choice)
        np.testing.assert_allclose(np.asarray(out.logprobs)[:, j], lp[np.arange(b), choice], atol=5e-5)
        seq = np.concatenate([seq, choice[:, None]], 1)
        smask = np.concatenate([smask, np.ones((b, 1), int)], 1)
    w0 = arm_decode.args_generate(base, rm, ids, mask, k=k, w=0.0, cfg=GREEDY)
    ref0 = []
    seq, smask = ids.copy(), mask.copy()
    for j in range(n):  # w = 0: the base's greedy path
        nxt = _torch_logits(hf_base, seq, smask)[:, -1].argmax(-1)
        ref0.append(nxt)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        smask = np.concatenate([smask, np.ones((b, 1), int)], 1)
    np.testing.assert_array_equal(np.asarray(w0.tokens), np.stack(ref0, 1))
