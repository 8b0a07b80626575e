"""The SWIFT training recipe: problem-level split, best-weights keeping, learning a planted signal."""
import jax
import numpy as np
import pytest

from swiftjax.methods.swift import head as swift
from swiftjax.methods.swift.train import ArraySource, SwiftTrainConfig, score_rows, split_groups, train_head


def _planted(g=40, k=8, t=6, f=12, seed=0):
    """Features whose mean along a hidden direction w says whether the response is correct."""
    rs = np.random.RandomState(seed)
    labels = (rs.rand(g, k) < 0.4).astype(np.float32)
    w = rs.randn(f).astype(np.float32)
    w /= np.linalg.norm(w)
    feats = rs.randn(g * k, t, f).astype(np.float32) * 0.5
    feats += (2 * labels.reshape(-1, 1, 1) - 1) * w
    mask = np.ones((g * k, t), np.float32)
    mask[:, -2:] = 0
    groups = np.arange(g * k).reshape(g, k)
    return ArraySource(feats, mask), groups, labels


def test_split_is_problem_level_and_seeded():
    tr, va = split_groups(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40
    assert not set(tr) & set(va)
    np.testing.assert_array_equal(va, split_groups(50, 0.2, seed=3)[1])
    with pytest.raises(ValueError, match="none for training"):
        split_groups(1, 0.5, 0)


@pytest.mark.parametrize("loss", ["ce", "infonca"])
def test_head_learns_a_planted_signal(loss):
    src, groups, labels = _planted()
    params, info = train_head(src, groups, labels, SwiftTrainConfig(loss=loss, lr=3e-2, max_epochs=8),
                              progress=False)
    s = score_rows(params, src, groups.reshape(-1)).reshape(labels.shape)
    # numpy reference of the gated score for the trained params
    f, m = src.features, src.mask
    uv = f @ params["kernel"] + params["bias"]
    g = 1 / (1 + np.exp(-uv[..., 0]))
    ref = (g * uv[..., 1] * m).sum(1) / np.maximum((g * m).sum(1), 1e-8)
    np.testing.assert_allclose(s.reshape(-1), ref, rtol=1e-4, atol=1e-5)
    pos, neg = s[labels == 1], s[labels == 0]
    assert (pos.mean() - neg.mean()) > 1.0
    assert info["n_val_groups"] == 8 and info["num_params"] == 2 * 12 + 2


def test_best_weights_are_kept_not_last():
    src, groups, labels = _planted(seed=1)
    cfg = SwiftTrainConfig(lr=0.5, max_epochs=6, patience=10)  # a wild lr: validation loss bounces
    params, info = train_head(src, groups, labels, cfg, progress=False)
    hist = info["history"]
    best = min(h["loss"] for h in hist)
    assert info["best_val_loss"] == pytest.approx(best)
    # re-evaluate the returned params on the validation groups: their loss is the best one
    _, g_val = split_groups(groups.shape[0], cfg.val_frac, cfg.seed)
    s = score_rows(params, src, groups[g_val].reshape(-1)).reshape(len(g_val), -1)
    got = float(swift.loss_fn("ce")(jax.numpy.asarray(s), jax.numpy.asarray(labels[g_val])))
    assert got == pytest.approx(best, rel=1e-5)


def test_bad_inputs():
    src, groups, labels = _planted(g=4)
    with pytest.raises(ValueError, match="same shape"):
        train_head(src, groups, labels[:, :3], progress=False)
    with pytest.raises(ValueError, match="loss"):
        SwiftTrainConfig(loss="mse")


def test_nan_at_masked_positions_trains_like_clean_features():
    src, groups, labels = _planted(g=12, seed=2)
    cfg = SwiftTrainConfig(lr=3e-2, max_epochs=2)
    clean, _ = train_head(src, groups, labels, cfg, progress=False)
    feats = src.features.copy()
    feats[src.mask == 0] = np.nan  # padding positions hold garbage
    poisoned, _ = train_head(ArraySource(feats, src.mask), groups, labels, cfg, progress=False)
    for k in ("kernel", "bias"):
        assert np.all(np.isfinite(poisoned[k]))
        np.testing.assert_allclose(poisoned[k], clean[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["train", "validation"])
def test_non_finite_features_at_response_positions_raise(where):
    src, groups, labels = _planted(g=12, seed=3)
    cfg = SwiftTrainConfig(max_epochs=2)
    from swiftjax.methods.swift.train import split_groups as split
    g_train, g_val = split(groups.shape[0], cfg.val_frac, cfg.seed)
    row = int(groups[(g_train if where == "train" else g_val)[0], 0])
    feats = src.features.copy()
    feats[row, 0] = np.nan  # position 0 is a response position (mask 1)
    match = "a finite loss and params" if where == "train" else "finite validation scores"
    with pytest.raises(ValueError, match=rf"train_head: expected {match}"):
        train_head(ArraySource(feats, src.mask), groups, labels, cfg, progress=False)


def test_diverging_lr_raises_instead_of_returning_nan_params():
    src, groups, labels = _planted(g=12, seed=4)
    with pytest.raises(ValueError, match="train_head: expected a finite loss and params"):
        train_head(src, groups, labels, SwiftTrainConfig(lr=1e38, max_epochs=3, val_frac=0.0), progress=False)


def test_a_store_pads_each_batch_to_its_rows_and_trains_like_full_width(tmp_path, monkeypatch):
    """A source that knows its rows' lengths (a feature store) pads each batch to its longest
    row rounded up to PAD_BUCKET; the head trained that way equals full-width training."""
    from swiftjax.data.store import FeatureStore, FeatureStoreWriter, from_bf16_bits, to_bf16_bits
    from swiftjax.methods.swift import train as T

    rs = np.random.RandomState(4)
    g, k, t, f = 12, 4, 20, 6
    lengths = rs.randint(2, t + 1, size=g * k)
    lengths[0] = t  # one row uses every column
    rows = [from_bf16_bits(to_bf16_bits(rs.randn(n, f) + 0.3 * (i % 2))) for i, n in enumerate(lengths)]
    labels = (np.arange(g * k) % 2).astype(np.float32).reshape(g, k)
    with FeatureStoreWriter(tmp_path / "st", f) as w:
        w.add(rows, labels.reshape(-1), np.repeat(np.arange(g), k))
    store = FeatureStore(tmp_path / "st")
    monkeypatch.setattr(T, "PAD_BUCKET", 4)
    assert T._pad_width(store, [1, 2]) == min(-(-int(lengths[[1, 2]].max()) // 4) * 4, t)
    assert T._pad_width(store, [0, 1]) == t
    full = ArraySource(*store.batch(np.arange(g * k), pad_to=t))  # no lengths: full width
    widths = set()
    real = store.batch
    monkeypatch.setattr(store, "batch", lambda idx, pad_to=None, **kw: widths.add(pad_to) or real(idx, pad_to, **kw))
    groups = np.arange(g * k).reshape(g, k)
    cfg = SwiftTrainConfig(loss="dpo", lr=1e-2, max_epochs=3, groups_per_batch=2)
    p_store, _ = train_head(store, groups, labels, cfg, progress=False)
    p_full, _ = train_head(full, groups, labels, cfg, progress=False)
    assert len(widths) > 1 and max(widths) <= t and all(w % 4 == 0 or w == t for w in widths)
    np.testing.assert_allclose(p_store["kernel"], p_full["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score_rows(p_store, store, np.arange(g * k)), score_rows(p_store, full, np.arange(g * k)),
                               rtol=1e-5, atol=1e-6)


class _Recording:
    """A source that records the rows asked of it per batch."""

    def __init__(self, src):
        self.src, self.feature_dim, self.max_len, self.calls = src, src.feature_dim, src.max_len, []

    def __len__(self):
        return len(self.src)

    def batch(self, indices, pad_to=None, **kw):
        self.calls.append(len(indices))
        return self.src.batch(indices, pad_to, **kw)


def test_score_rows_batches_are_bounded_by_bytes_and_give_the_same_scores(monkeypatch):
    from swiftjax.methods.swift import train as T

    src, groups, labels = _planted(g=10, t=6, f=12)
    params = swift.init_params(jax.random.key(0), 12)
    whole = score_rows(params, src, np.arange(80), batch_size=80)
    rec = _Recording(src)
    assert T.score_batch_rows(rec) == 256 and T.score_batch_rows(rec, cap=7) == 7
    monkeypatch.setattr(T, "SCORE_BATCH_BYTES", 5 * 6 * 12 * 4 + 3)  # room for 5 rows, not 6
    assert T.score_batch_rows(rec) == 5
    got = score_rows(params, rec, np.arange(80))
    assert rec.calls == [5] * 16
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(T, "SCORE_BATCH_BYTES", 1)  # a row wider than the budget still scores, one at a time
    assert T.score_batch_rows(rec) == 1
    with pytest.raises(ValueError, match="batch_size: expected >= 1"):
        score_rows(params, src, np.arange(4), batch_size=0)


def test_normed_layer_view_equals_the_norm_of_the_columns_and_leaves_the_source_alone():
    from swiftjax.methods.swift.train import LayerView

    rs = np.random.RandomState(3)
    d, layers = 4, 3
    feats = rs.randn(6, 5, layers * d).astype(np.float32)
    mask = (rs.rand(6, 5) < 0.7).astype(np.float32)
    src = ArraySource(feats, mask)
    before = feats.copy()
    w = rs.randn(d).astype(np.float32)

    def norm(x):  # an RMS norm with a weight, over the last axis
        return x / jax.numpy.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w

    view = LayerView(src, range(layers), (2, 0), d, norm=norm)
    x, m = view.batch(np.array([4, 1, 3]))
    cols = np.concatenate([feats[[4, 1, 3]][..., :d], feats[[4, 1, 3]][..., 2 * d:]], -1).reshape(3, 5, 2, d)
    ref = cols / np.sqrt((cols ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(x, ref.reshape(3, 5, 2 * d) * mask[[4, 1, 3]][..., None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m, mask[[4, 1, 3]])
    np.testing.assert_array_equal(feats, before)


def test_normed_view_trains_and_scores_like_its_host_normed_features():
    """A normed LayerView is read raw and normed inside the jitted step (train.device_split):
    the head and the scores equal those of the same features normed on the host."""
    from swiftjax.methods.swift.train import LayerView, device_split

    src, groups, labels = _planted(g=12, t=6, f=12, seed=5)  # 3 blocks of d = 4
    w = np.linspace(0.5, 1.5, 4).astype(np.float32)

    def norm(x):
        return x / jax.numpy.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w

    view = LayerView(src, range(3), (0, 2), 4, norm=norm)
    read, fn = device_split(view)
    assert fn is not None and read.norm is None and device_split(src) == (src, None)
    host = ArraySource(*view.batch(np.arange(len(src))))
    cfg = SwiftTrainConfig(lr=3e-2, max_epochs=3)
    p_view, i_view = train_head(view, groups, labels, cfg, progress=False)
    p_host, i_host = train_head(host, groups, labels, cfg, progress=False)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(p_view[k], p_host[k], rtol=1e-5, atol=1e-6)
    assert i_view["best_val_loss"] == pytest.approx(i_host["best_val_loss"], rel=1e-5)
    rows = np.arange(len(src))
    np.testing.assert_allclose(score_rows(p_view, view, rows), score_rows(p_view, host, rows), rtol=1e-5, atol=1e-6)


def test_standardized_training_equals_training_on_numpy_standardized_features_folded_back():
    """standardize=True: moments over the training groups' response tokens (numpy reference),
    the head trained on (x - mean) / sd, returned folded so it scores raw features the same."""
    from swiftjax.methods.swift.train import feature_moments, fold_standardization

    src, groups, labels = _planted(g=20, t=6, f=12, seed=6)
    feats = src.features.copy()
    feats[..., 3] = feats[..., 3] * 1000.0 + 50.0  # one huge, offset dimension
    feats[..., 7] = 2.5  # a constant one
    raw = ArraySource(feats, src.mask)
    cfg = SwiftTrainConfig(lr=3e-2, max_epochs=3, standardize=True)
    g_train, _ = split_groups(groups.shape[0], cfg.val_frac, cfg.seed)
    tok = feats[groups[g_train].reshape(-1)][src.mask[groups[g_train].reshape(-1)] > 0]  # [tokens, F]
    mean, sd = tok.mean(0), tok.std(0)
    sd[7] = 1.0
    got_mean, got_sd = feature_moments(raw, groups[g_train].reshape(-1))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_sd, sd, rtol=1e-4)
    p_std, _ = train_head(raw, groups, labels, cfg, progress=False)
    z = ArraySource(((feats - mean) / sd).astype(np.float32), src.mask)
    p_ref, _ = train_head(z, groups, labels, SwiftTrainConfig(lr=3e-2, max_epochs=3), progress=False)
    folded = fold_standardization(p_ref, mean, sd)
    np.testing.assert_allclose(p_std["kernel"], folded["kernel"], rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(p_std["bias"], folded["bias"], rtol=2e-4, atol=1e-4)
    rows = np.arange(len(raw))
    np.testing.assert_allclose(score_rows(p_std, raw, rows), score_rows(p_ref, z, rows), rtol=1e-4, atol=1e-4)


def test_feature_moments_of_a_feature_whose_mean_dwarfs_its_spread():
    from swiftjax.methods.swift.train import feature_moments

    rs = np.random.RandomState(8)
    x = (1000.0 + 0.01 * rs.randn(40, 5, 3)).astype(np.float32)
    mask = np.ones((40, 5), np.float32)
    mask[:, 3:] = 0
    mean, sd = feature_moments(ArraySource(x, mask), np.arange(40))
    tok = x[:, :3].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, tok.mean(0), rtol=1e-7)
    np.testing.assert_allclose(sd, tok.std(0), rtol=1e-3)  # float32 values: spread known to ~1e-4 of 0.01
    with pytest.raises(ValueError, match="at least one response token"):
        feature_moments(ArraySource(x, np.zeros_like(mask)), np.arange(40))
