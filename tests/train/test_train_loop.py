"""swiftjax.train.loop: schedules, optimizers and the step against numpy references, fit's
early stopping / metrics / epochs, the NNX adapter, input validation (1 CPU device)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax.train import loop
from swiftjax.train.metrics import EvalLogWriter, JsonlWriter, read_jsonl

D, N = 5, 8


def _lin_loss(params, batch, rng):
    del rng
    r = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(r**2), {"abs": jnp.mean(jnp.abs(r))}


def _np_grad(w, x, y):
    return 2.0 / len(y) * x.T @ (x @ w - y)


def _batches(n, seed=0, size=N):
    rs = np.random.RandomState(seed)
    return [
        {"x": rs.randn(size, D).astype(np.float32), "y": rs.randn(size).astype(np.float32)}
        for _ in range(n)
    ]


def _np_schedule(s, lr, warmup, total, ratio, kind):
    end = lr * ratio
    if warmup and s < warmup:
        return lr * s / warmup
    if kind == "constant":
        return lr
    dec = total - warmup
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * min(s - warmup, dec) / dec))


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize(
    "kind,warmup,total,ratio",
    [("cosine", 10, 50, 0.1), ("cosine", 0, 30, 0.0), ("constant", 7, None, 0.0), ("constant", 0, None, 0.0)],
)
def test_schedule_matches_numpy_formula(kind, warmup, total, ratio):
    cfg = loop.OptimizerConfig(lr=3e-3, schedule=kind, warmup_steps=warmup, total_steps=total,
                               final_lr_ratio=ratio)
    sched = loop.make_schedule(cfg)
    for s in range(0, (total or 20) + 15):
        want = _np_schedule(s, 3e-3, warmup, total, ratio, kind)
        np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-10)


def test_learning_rate_fn_counts_micro_steps_under_accumulation():
    cfg = loop.OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=4, total_steps=20, accum_steps=3)
    f = loop.learning_rate_fn(cfg)
    for s in range(60):
        np.testing.assert_allclose(float(f(s)), _np_schedule(s // 3, 1.0, 4, 20, 0.0, "cosine"),
                                   rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------- optimizers
def test_adamw_with_clip_and_schedule_matches_numpy():
    cfg = loop.OptimizerConfig(lr=0.1, weight_decay=0.05, b1=0.8, b2=0.95, eps=1e-6,
                               schedule="cosine", warmup_steps=2, total_steps=8, clip_norm=0.5)
    tx = loop.make_optimizer(cfg)
    w0 = np.random.RandomState(1).randn(D).astype(np.float32)
    state = loop.init_state({"w": jnp.asarray(w0)}, tx, 0)
    step = loop.make_train_step(_lin_loss, tx, lr_fn=loop.learning_rate_fn(cfg))
    w, m, v = w0.astype(np.float64), np.zeros(D), np.zeros(D)
    for t, b in enumerate(_batches(6, seed=2)):
        state, metrics = step(state, b)
        g = _np_grad(w, b["x"].astype(np.float64), b["y"].astype(np.float64))
        np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(g), rtol=1e-5)
        g = g * 0.5 / max(np.linalg.norm(g), 0.5)
        m = 0.8 * m + 0.2 * g
        v = 0.95 * v + 0.05 * g * g
        mh, vh = m / (1 - 0.8 ** (t + 1)), v / (1 - 0.95 ** (t + 1))
        lr = _np_schedule(t, 0.1, 2, 8, 0.0, "cosine")
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-5, atol=1e-10)
        w = w - lr * (mh / (np.sqrt(vh) + 1e-6) + 0.05 * w)
        np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5, atol=1e-6)
    assert int(state.step) == 6


def test_rmsprop_matches_torch_semantics_in_numpy():
    cfg = loop.OptimizerConfig(name="rmsprop", lr=0.01, rms_decay=0.9, eps=1e-3, momentum=0.5,
                               weight_decay=0.1)
    tx = loop.make_optimizer(cfg)
    w0 = np.random.RandomState(3).randn(D).astype(np.float32)
    state = loop.init_state({"w": jnp.asarray(w0)}, tx, 0)
    step = loop.make_train_step(_lin_loss, tx)
    w, sq, buf = w0.astype(np.float64), np.zeros(D), np.zeros(D)
    for b in _batches(5, seed=4):
        state, _ = step(state, b)
        g = _np_grad(w, b["x"].astype(np.float64), b["y"].astype(np.float64)) + 0.1 * w
        sq = 0.9 * sq + 0.1 * g * g
        buf = 0.5 * buf + g / (np.sqrt(sq) + 1e-3)
        w = w - 0.01 * buf
        np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5, atol=1e-6)


def test_multisteps_accumulation_equals_big_batch_step():
    big = _batches(1, seed=5, size=2 * N)[0]
    halves = [{k: v[:N] for k, v in big.items()}, {k: v[N:] for k, v in big.items()}]
    w0 = {"w": np.random.RandomState(6).randn(D).astype(np.float32)}  # numpy: never donated
    base = dict(lr=0.05, weight_decay=0.01, clip_norm=1.0)
    tx1 = loop.make_optimizer(loop.OptimizerConfig(**base))
    s1, _ = loop.make_train_step(_lin_loss, tx1)(loop.init_state(w0, tx1, 0), big)
    tx2 = loop.make_optimizer(loop.OptimizerConfig(**base, accum_steps=2))
    step2 = loop.make_train_step(_lin_loss, tx2)
    s2 = loop.init_state(w0, tx2, 0)
    s2, _ = step2(s2, halves[0])
    np.testing.assert_array_equal(np.asarray(s2.params["w"]), w0["w"])  # no update yet
    s2, _ = step2(s2, halves[1])
    np.testing.assert_allclose(np.asarray(s2.params["w"]), np.asarray(s1.params["w"]), atol=1e-6)
    assert not np.allclose(np.asarray(s1.params["w"]), w0["w"])


def test_train_step_rng_advances_and_reaches_the_loss():
    seen = []

    def loss_fn(params, batch, rng):
        noise = jax.random.normal(rng, ())
        return jnp.sum(params["w"] ** 2) + 0.0 * noise, {"noise": noise}

    tx = loop.make_optimizer(loop.OptimizerConfig(name="sgd", lr=0.1))
    state = loop.init_state({"w": jnp.ones(3)}, tx, 7)
    step = loop.make_train_step(loss_fn, tx)
    key = jax.random.PRNGKey(7)
    for _ in range(3):
        state, m = step(state, {})
        key, sub = jax.random.split(key)
        seen.append(float(m["noise"]))
        assert float(m["noise"]) == float(jax.random.normal(sub, ()))
    assert len(set(seen)) == 3
    np.testing.assert_allclose(np.asarray(state.params["w"]), 0.8**3 * np.ones(3), rtol=1e-6)


# ------------------------------------------------------------------------- fit
def test_fit_early_stopping_keeps_best_not_last_params():
    tx = loop.make_optimizer(loop.OptimizerConfig(lr=0.05))
    state = loop.init_state({"w": jnp.zeros(D)}, tx, 0)
    step = loop.make_train_step(_lin_loss, tx)
    values = [5.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0]
    snapshots = []

    def eval_fn(params):
        snapshots.append(np.array(jax.device_get(params["w"])))
        return {"val": values[len(snapshots) - 1]}

    res = loop.fit(state, step, _batches(50, seed=8), max_steps=50, eval_fn=eval_fn, eval_every=1,
                   early_stopping=loop.EarlyStopping("val", "min", patience=2), progress=False)
    assert res.stopped_early and res.steps == 5 and len(snapshots) == 5
    assert res.best_step == 3 and res.best_metric == 2.0
    np.testing.assert_array_equal(np.asarray(res.best_params["w"]), snapshots[2])
    assert not np.allclose(np.asarray(res.state.params["w"]), snapshots[2])
    assert [h["val"] for h in res.history] == values[:5]


def test_early_stopping_modes_and_min_delta():
    es = loop.EarlyStopping("acc", "max", patience=3, min_delta=0.1)
    assert es.improved(0.5, None) and es.improved(0.61, 0.5) and not es.improved(0.55, 0.5)
    es = loop.EarlyStopping("loss", "min")
    assert es.improved(0.9, 1.0) and not es.improved(1.0, 1.0)


def test_fit_writes_jsonl_metrics(tmp_path):
    tx = loop.make_optimizer(loop.OptimizerConfig(lr=0.05))
    w0 = np.random.RandomState(9).randn(D).astype(np.float32)
    state = loop.init_state({"w": jnp.asarray(w0)}, tx, 0)
    batches = _batches(6, seed=10)
    path = tmp_path / "m" / "metrics.jsonl"
    with JsonlWriter(path, process_index=0) as wr:
        loop.fit(state, loop.make_train_step(_lin_loss, tx), batches, epochs=1, writer=wr,
                 eval_fn=lambda p: {"wnorm": float(jnp.linalg.norm(p["w"]))}, eval_every=3,
                 progress=False)
    recs = read_jsonl(path)
    train = [r for r in recs if r["split"] == "train"]
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    b = batches[0]
    want = np.mean((b["x"].astype(np.float64) @ w0 - b["y"]) ** 2)
    np.testing.assert_allclose(train[0]["loss"], want, rtol=1e-5)
    assert {"loss", "grad_norm", "abs"} <= set(train[0])


def test_eval_log_writer_logs_one_line_per_evaluation_and_nothing_else():
    tx = loop.make_optimizer(loop.OptimizerConfig(lr=0.05))
    state = loop.init_state({"w": jnp.zeros(D)}, tx, 0)
    lines = []
    loop.fit(state, loop.make_train_step(_lin_loss, tx), _batches(6, seed=10), epochs=1,
             writer=EvalLogWriter(lines.append, "val at ", process_index=0),
             eval_fn=lambda p: {"loss": 0.25, "n": 3}, eval_every=3, progress=False)
    assert lines == ["val at step 3: loss 0.25, n 3", "val at step 6: loss 0.25, n 3"]
    quiet = []
    EvalLogWriter(quiet.append, process_index=1).write(3, {"split": "eval", "loss": 1.0})
    assert quiet == []


def test_fit_epochs_callable_and_same_seed_same_result():
    calls = []

    def batches(epoch):
        calls.append(epoch)
        return _batches(3, seed=100 + epoch)

    def run():
        tx = loop.make_optimizer(loop.OptimizerConfig(lr=0.05, schedule="cosine", total_steps=6))
        state = loop.init_state({"w": jnp.ones(D)}, tx, 3)
        return loop.fit(state, loop.make_train_step(_lin_loss, tx), batches, epochs=2, progress=False)

    a, b = run(), run()
    assert a.steps == 6 and calls == [0, 1, 0, 1]
    np.testing.assert_array_equal(np.asarray(a.state.params["w"]), np.asarray(b.state.params["w"]))
    # max_steps stops inside an epoch; a one-shot iterator ends training when exhausted
    tx = loop.make_optimizer(loop.OptimizerConfig(lr=0.05))
    st = loop.init_state({"w": jnp.ones(D)}, tx, 3)
    r = loop.fit(st, loop.make_train_step(_lin_loss, tx), batches, max_steps=4, progress=False)
    assert r.steps == 4
    st = loop.init_state({"w": jnp.ones(D)}, tx, 3)
    r = loop.fit(st, loop.make_train_step(_lin_loss, tx), iter(_batches(3)), max_steps=10, progress=False)
    assert r.steps == 3


def test_make_eval_fn_averages_over_batches():
    bs = _batches(3, seed=11)
    f = loop.make_eval_fn(lambda p, b: {"loss": _lin_loss(p, b, None)[0]}, bs)
    w = np.random.RandomState(12).randn(D).astype(np.float32)
    want = np.mean([np.mean((b["x"] @ w - b["y"]) ** 2) for b in bs])
    np.testing.assert_allclose(f({"w": jnp.asarray(w)})["loss"], want, rtol=1e-5)


# ------------------------------------------------------------------------- NNX
def test_nnx_split_trains_only_lora_params():
    from flax import nnx

    model = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0),
                           b_initializer=nnx.initializers.normal(0.5))
    graphdef, trainable, frozen = loop.nnx_split(model, nnx.LoRAParam)
    k = np.asarray(model.kernel[...]); bias = np.asarray(model.bias[...])
    a = np.asarray(model.lora.lora_a[...]); bb = np.asarray(model.lora.lora_b[...])

    def fn(m, batch, rng):
        return jnp.mean((m(batch["x"]) - batch["y"]) ** 2), {}

    tx = loop.make_optimizer(loop.OptimizerConfig(name="sgd", lr=0.1))
    state = loop.init_state(trainable, tx, 0, frozen=frozen)
    step = loop.make_train_step(loop.nnx_loss(graphdef, fn), tx)
    rs = np.random.RandomState(13)
    batch = {"x": rs.randn(6, 4).astype(np.float32), "y": rs.randn(6, 3).astype(np.float32)}
    state, m = step(state, batch)
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    r = x @ k + bias + x @ a @ bb - y
    np.testing.assert_allclose(float(m["loss"]), np.mean(r**2), rtol=1e-5)
    g = 2 * r / r.size
    ga, gb = x.T @ (g @ bb.T), (x @ a).T @ g
    new = loop.nnx_merge(graphdef, state.params, state.frozen)
    np.testing.assert_allclose(np.asarray(new.lora.lora_a[...]), a - 0.1 * ga, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.lora.lora_b[...]), bb - 0.1 * gb, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.kernel[...]), k)
    np.testing.assert_array_equal(np.asarray(new.bias[...]), bias)


def test_nnx_split_rejects_bad_inputs():
    from flax import nnx

    with pytest.raises(ValueError, match="nnx.Module"):
        loop.nnx_split({"w": 1})
    with pytest.raises(ValueError, match="selects no variable"):
        loop.nnx_split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.LoRAParam)


# ------------------------------------------------------------------ validation
def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="optimizer name"):
        loop.OptimizerConfig(name="lion")
    with pytest.raises(ValueError, match="total_steps"):
        loop.OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="lr"):
        loop.OptimizerConfig(lr=-1.0)
    with pytest.raises(ValueError, match="accum_steps"):
        loop.OptimizerConfig(accum_steps=0)
    with pytest.raises(ValueError, match="unknown keys"):
        loop.OptimizerConfig.from_dict({"lr": 1e-3, "beta": 0.9})
    assert loop.OptimizerConfig.from_dict({"lr": 2e-3}).lr == 2e-3
    tx = loop.make_optimizer(loop.OptimizerConfig())
    with pytest.raises(ValueError, match="rng"):
        loop.init_state({"w": jnp.ones(2)}, tx, jnp.ones(3))
    with pytest.raises(ValueError, match="params"):
        loop.init_state({}, tx, 0)
    state = loop.init_state({"w": jnp.ones(2)}, tx, jax.random.key(0))
    assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
    step = loop.make_train_step(_lin_loss, tx)
    with pytest.raises(ValueError, match="max_steps or epochs"):
        loop.fit(state, step, [])
    with pytest.raises(ValueError, match="eval_fn"):
        loop.fit(state, step, [], epochs=1, early_stopping=loop.EarlyStopping())
    with pytest.raises(ValueError, match="mode"):
        loop.EarlyStopping(mode="best")
