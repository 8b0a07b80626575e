"""A SWIFT feature study: many heads on one backbone and task, from two forwards.

    swiftjax swift study CONFIG [k=v ...]     # writes OUT/study.json and OUT/study.md

Each *variant* (a name and a :class:`~swiftjax.methods.swift.features.FeatureSpec`) gets its own
head, trained on the train candidates only, and is scored on the test candidates; the table puts
every variant and every confidence score the sampler recorded under every selection rule, over
random k-subsets with standard errors (:func:`swiftjax.selection.selection_table`).

What it costs: ONE teacher-forced forward over the train candidates writes every feature store
the variants need (:func:`store_plan`: one store of the raw states of the union of the hidden
variants' layers, which serves every layer subset with and without the final norm through
:class:`~swiftjax.methods.swift.train.LayerView`, plus one store per logits-mode spec), and ONE
forward over the test candidates scores every head
(:func:`~swiftjax.methods.swift.features.fused_scores_many`). Heads of a few layers (their
union at most :data:`NARROW_AT_MOST` of the big store's) read a store of just those layers,
copied bit for bit from the big one once (:func:`narrowed_store`): an epoch then reads a
fraction of the bytes, from the page cache rather than the disk. On a 2-core CPU that forward is
the cost of a stage; a study of k variants no longer pays it k times.

Every stage is reused when rerun with the same inputs, so a killed study continues: stores by
(backbone, rows, spec, width), heads by (their store's key, the variant's spec, the training
config), test scores by (backbone, rows, width, every head's weights); a store killed while
being written continues from its last checkpoint (every 64 rows), test scoring from its last
chunk of :data:`TEST_CHUNK_ROWS` rows. ``share_prompts: true`` computes each prompt once for
its N candidates in both forwards (what a chat template and a long question make worth it).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from swiftjax import bon
from swiftjax import selection as selection_mod
from swiftjax._io import atomic_file
from swiftjax.config import parse_typed, to_plain
from swiftjax.data import candidates as cands
from swiftjax.data.store import FeatureStore, narrow_store
from swiftjax.methods.swift import features as feats
from swiftjax.methods.swift import pipeline
from swiftjax.methods.swift import train as train_mod
from swiftjax.methods.swift.head_io import load_head, save_head
from swiftjax.parallel import use_mesh
from swiftjax.sample import check_writable, digest
from swiftjax.tasks import make_task

__all__ = ["Variant", "SwiftStudyConfig", "store_plan", "run_study", "markdown", "main"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One head of a study: its name (a directory name under OUT/heads), its features and,
    optionally, its own learning rate and standardization (None: the study's ``swift.lr`` /
    ``swift.standardize``; wide or normed hidden states may need a smaller rate, or their
    features standardized, where a few log-prob features do not)."""

    name: str = ""
    features: feats.FeatureSpec = feats.FeatureSpec()
    lr: float | None = None
    standardize: bool | None = None

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"name: expected letters, digits, '_', '.', '-' (a directory name), got {self.name!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate or null, got {self.lr!r}")

    def recipe(self, cfg):
        """The run config ``cfg`` with this head's own settings in its ``swift`` recipe."""
        own = {k: v for k, v in (("lr", self.lr), ("standardize", self.standardize)) if v is not None}
        return dataclasses.replace(cfg, swift=dataclasses.replace(cfg.swift, **own)) if own else cfg


DEFAULT_VARIANTS = (
    Variant("hidden_all", feats.FeatureSpec()),                      # the paper: every state, as sown
    Variant("hidden_all_norm", feats.FeatureSpec(apply_norm=True)),
    Variant("token_logprobs", feats.FeatureSpec(mode="token_logprobs", k=4)),
    Variant("topk_logprobs", feats.FeatureSpec(mode="topk_logprobs", k=16)),
)


@dataclasses.dataclass(frozen=True)
class SwiftStudyConfig(pipeline.SwiftRunConfig):
    """A :class:`~swiftjax.methods.swift.pipeline.SwiftRunConfig` (candidates, sampling, training
    recipe; ``features`` is unused) plus the variants. ``cache``: where the candidates and
    stores live (e.g. the sampling run's ``out``), so a study reuses them."""

    out: str = "runs/swift_study"
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS

    def __post_init__(self):
        super().__post_init__()
        if not self.variants:
            raise ValueError("variants: expected at least one variant")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variants: expected distinct names, got {dup} more than once")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a variant's training features come from: store ``store`` (an index into the plan's
    store specs), cut to ``layers`` (hidden variants; None: the store as is), normed or not."""

    store: int
    layers: tuple[int, ...] | None = None
    apply_norm: bool = False


def store_plan(specs, num_layers: int) -> tuple[list[feats.FeatureSpec], list[Source]]:
    """The fewest stores serving every spec: (store specs, one :class:`Source` per spec).

    Hidden specs share one raw store over the union of their layers ('all' when that is every
    state); logits-mode specs get one store per distinct spec."""
    hidden = sorted({i for s in specs if s.mode == "hidden" for i in feats.resolve_layers(s, num_layers)})
    stores: list[feats.FeatureSpec] = []
    if hidden:
        union = "all" if hidden == list(range(num_layers + 1)) else tuple(hidden)
        stores.append(feats.FeatureSpec(layers=union))
    sources = []
    for s in specs:
        if s.mode == "hidden":
            sources.append(Source(0, feats.resolve_layers(s, num_layers), s.apply_norm))
        else:
            if s not in stores:
                stores.append(s)
            sources.append(Source(stores.index(s)))
    return stores, sources


def _source(store, store_layers, src: Source, backbone, norm):
    if src.layers is None:
        return store
    return train_mod.LayerView(store, store_layers, src.layers, backbone.model.config.hidden_size,
                               norm=norm if src.apply_norm else None)


NARROW_AT_MOST = 0.5  # layer-subset heads read a store of their layers when those are <= this share of the big one


def subset_layers(sources, store: int, store_layers) -> list[int]:
    """The union of the layers the hidden sources of store ``store`` read when they read fewer
    than all of ``store_layers`` (empty when none does)."""
    every = set(store_layers)
    return sorted({l for s in sources if s.store == store and s.layers is not None and set(s.layers) != every
                   for l in s.layers})


def narrowed_store(store, store_layers, layers, d: int, cache: Path, log):
    """The store of ``layers``' blocks of a raw hidden-state ``store`` (its blocks: ``store_layers``,
    each ``d`` wide), written from it once under ``cache`` and reused, keyed by the big store's
    key and the layers. The values are the same bits, so a head trained from it is the head
    trained from the big store (heads keep the big store's key)."""
    key = {"narrowed_from": store.meta.get("key"), "layers": [int(l) for l in layers]}
    path = Path(cache) / f"features_{digest(key)}"
    try:
        small = FeatureStore(path)
        if small.meta.get("key") == key:
            log(f"reusing {path} (layers {list(layers)})")
            return small
    except ValueError:
        pass
    t0 = time.time()
    small = narrow_store(store, path, train_mod.layer_columns(store_layers, layers, d),
                         spec={**store.spec, "layers": [int(l) for l in layers]}, meta={**store.meta, "key": key})
    log(f"narrowed {store.path.name} to layers {list(layers)} (F={small.feature_dim}) in {time.time() - t0:.0f}s "
        f"-> {path}")
    return small


def _trained_head(cfg: SwiftStudyConfig, variant: Variant, source_fn, store, correct, out: Path, log):
    """(params, info) of a variant's head: loaded when OUT/heads/NAME was trained on the same
    store, spec and recipe, else trained on ``source_fn()`` (called only then) and its in-sample
    train scores kept in the info."""
    cfg = variant.recipe(cfg)
    recipe = to_plain(cfg.swift)
    if not recipe.get("standardize"):  # heads trained before the option existed keep their key
        recipe.pop("standardize", None)
    key = {"store": store.meta.get("key"), "spec": variant.features.to_dict(), "swift": recipe,
           "rollouts_per_group": cfg.rollouts_per_group}
    path = out / "heads" / variant.name
    try:
        params, spec, meta = load_head(path)
        if meta.get("info", {}).get("key") == key and spec == variant.features:
            log(f"{variant.name}: reusing the head in {path}")
            return params, meta["info"]
    except ValueError:
        pass
    source = source_fn()
    log(f"{variant.name}: training a head on F={source.feature_dim} features")
    params, info = pipeline.train_on_store(source, correct, cfg, log=log)
    t0 = time.time()
    info["train_scores"] = train_mod.score_rows(params, source, np.arange(len(source))).tolist()
    info["train_scoring_seconds"] = round(time.time() - t0, 3)
    info["key"] = key
    save_head(path, params, variant.features, info)
    return params, info


TEST_CHUNK_ROWS = 96  # test scores are saved every this many rows (whole problems): a kill loses one chunk


def _test_scores(cfg, backbone, heads, ordered_rows, max_len: int, out: Path, log) -> tuple[np.ndarray, float, int]:
    """[H, N] test scores of every head from one forward, cached under OUT by everything they
    depend on, written chunk by chunk (``OUT/test_scores_<key>.parts/``) so a killed study
    continues. Returns (scores, seconds spent now, response tokens scored now)."""
    key = {"model": backbone.digest, "rows": digest([(r["prompt"], r["token_ids"]) for r in ordered_rows]),
           "max_len": max_len, "heads": [digest([np.asarray(p["kernel"]).tolist(), np.asarray(p["bias"]).tolist(),
                                                  s.to_dict()]) for p, s in heads],
           **({"shared_prompts": True} if cfg.share_prompts else {})}
    name = f"test_scores_{digest(key)}"
    path = out / f"{name}.npy"
    shape = (len(heads), len(ordered_rows))
    if path.is_file():
        scores = np.load(path, allow_pickle=False)
        if scores.shape == shape and np.isfinite(scores).all():
            log(f"reusing {path}")
            return scores, 0.0, 0
    t0 = time.time()
    ids, attn, resp = pipeline.encode_rows(backbone, ordered_rows, max_len)
    parts = out / f"{name}.parts"
    chunk = max(1, TEST_CHUNK_ROWS // cfg.n) * cfg.n
    scores, tokens = [], 0
    for a in range(0, len(ordered_rows), chunk):
        b = min(len(ordered_rows), a + chunk)
        f = parts / f"rows_{a:06d}_{b:06d}.npy"
        if f.is_file():
            s = np.load(f, allow_pickle=False)
            if s.shape == (len(heads), b - a) and np.isfinite(s).all():
                scores.append(s)
                continue
        s = feats.fused_scores_many(backbone.model, heads, ids[a:b], attn[a:b], resp[a:b],
                                    batch_size=cfg.extract_batch, progress=cfg.progress,
                                    share_prompts=cfg.share_prompts)
        with atomic_file(f, "wb") as fh:
            np.save(fh, s)
        scores.append(s)
        tokens += int(resp[a:b].sum())
    scores = np.concatenate(scores, axis=1)
    with atomic_file(path, "wb") as f:
        np.save(f, scores)
    shutil.rmtree(parts, ignore_errors=True)
    return scores, time.time() - t0, tokens


def run_study(cfg: SwiftStudyConfig, *, log=print) -> dict:
    """The whole study; writes OUT/study.json and OUT/study.md and returns the result."""
    t_start = time.time()
    out = check_writable(Path(cfg.out), "out")
    cache = check_writable(Path(cfg.cache), "cache") if cfg.cache else out
    backbone = pipeline.backbone_of(cfg)
    task = make_task(cfg.task)
    mcfg = backbone.model.config
    store_specs, sources = store_plan([v.features for v in cfg.variants], mcfg.num_layers)

    test_rows, _ = pipeline._candidates(cfg, backbone, task, "test", log)
    train_rows, _ = pipeline._candidates(cfg, backbone, task, "train", log)
    train_rows = pipeline._train_rows(cfg, task, train_rows)
    max_len = pipeline._max_len(cfg, backbone, train_rows, test_rows)
    stages = {}

    t0 = time.time()
    stores, tr_ids, tr_arr = pipeline.feature_stores_for(backbone, train_rows, store_specs, cache, max_len=max_len,
                                                         batch_size=cfg.extract_batch, progress=cfg.progress, log=log,
                                                         share_prompts=cfg.share_prompts)
    stages["train_features_seconds"] = round(time.time() - t0, 3)
    norm = jax.jit(backbone.model.final_norm)
    layers_of = [feats.resolve_layers(sp, mcfg.num_layers) if sp.mode == "hidden" else None for sp in store_specs]
    narrow = {}  # store index -> (the store of its subset heads' layers, those layers), made when first needed

    def source_of(src: Source):
        read, read_layers = stores[src.store], layers_of[src.store]
        union = subset_layers(sources, src.store, read_layers) if read_layers is not None else []
        if (src.layers is not None and set(src.layers) <= set(union)
                and len(union) <= NARROW_AT_MOST * len(read_layers)):
            if src.store not in narrow:
                t0 = time.time()
                narrow[src.store] = (narrowed_store(read, read_layers, union, mcfg.hidden_size, cache, log), union)
                stages["narrow_seconds"] = round(time.time() - t0, 3)
            read, read_layers = narrow[src.store]
        return _source(read, read_layers, src, backbone, norm)

    heads, infos = [], {}
    for v, src in zip(cfg.variants, sources):
        params, info = _trained_head(cfg, v, lambda src=src: source_of(src), stores[src.store], tr_arr["correct"],
                                     out, log)
        heads.append((params, v.features))
        infos[v.name] = info

    te_ids, te_arr = cands.group(test_rows)
    ordered = pipeline.in_group_order(test_rows, te_ids)
    scores, secs, tokens = _test_scores(cfg, backbone, heads, ordered, max_len, out, log)
    if tokens:
        stages["test_scoring_seconds"] = round(secs, 3)
        stages["test_scoring_response_tokens_per_s"] = round(tokens / secs, 1)
        log(f"scored {len(ordered)} test candidates with {len(heads)} heads in one forward: {secs:.0f}s")

    shape = te_arr["correct"].shape
    test = {v.name: s.reshape(shape) for v, s in zip(cfg.variants, scores)}
    train = {v.name: np.asarray(infos[v.name]["train_scores"]).reshape(tr_arr["correct"].shape) for v in cfg.variants}
    test.update(te_arr["scores"])
    train.update(tr_arr["scores"])
    temps = {name: selection_mod.fit_temperature(tr_arr["answers"], tr_arr["correct"], train[name])
             for name in test if name in train}
    ks = bon.default_ks(cfg.n)
    curves = selection_mod.selection_table(te_arr["answers"], te_arr["correct"], test, ks, temperatures=temps,
                                           seed=cfg.seed)
    result = {
        "n": cfg.n, "ks": ks, "n_test_problems": len(te_ids), "n_train_problems": len(tr_ids),
        "vs_majority": vs_majority(te_arr["answers"], te_arr["correct"], {v.name: test[v.name] for v in cfg.variants},
                                   temps, seed=cfg.seed),
        "pass@1": float(te_arr["correct"].mean() * 100),
        "temperatures": temps,
        "curves": {c: {str(k): list(v) for k, v in vals.items()} for c, vals in curves.items()},
        "variants": {v.name: {"features": v.features.to_dict(), "feature_dim": int(heads[i][0]["kernel"].shape[0]),
                              **{k: getattr(v.recipe(cfg).swift, k) for k in ("lr", "standardize")},
                              **{k: infos[v.name][k] for k in ("num_params", "epochs_run", "best_val_loss",
                                                               "train_seconds") if k in infos[v.name]}}
                     for i, v in enumerate(cfg.variants)},
        "stages": stages,
        "model": backbone.describe(),
        "task": task.describe(),
        "config": to_plain(cfg),
        "wall_seconds": round(time.time() - t_start, 3),
    }
    result["verdict"] = verdict(result)
    with atomic_file(out / "study.json", "w") as f:
        f.write(json.dumps(result, indent=2, default=float))
    with atomic_file(out / "study.md", "w") as f:
        f.write(markdown(result) + "\n")
    return result


def vs_majority(answers, correct, scores: dict, temperatures: dict, *, seed: int = 0) -> dict[str, list[float]]:
    """{"<variant>/<rule>": [difference, standard error]} in points at k = N against majority vote,
    paired over the test problems (both rules see the same N candidates of each problem)."""
    n = np.asarray(correct).shape[1]
    maj = selection_mod.per_problem_at_k("majority", answers, None, correct, [n], seed=seed)[n]
    out = {}
    for name, s in scores.items():
        for rule in selection_mod.SCORED_RULES:
            vals = selection_mod.rule_inputs(s, rule, temperatures.get(name, 1.0))
            per = selection_mod.per_problem_at_k(rule, answers, vals, correct, [n], seed=seed)[n]
            out[f"{name}/{rule}"] = list(selection_mod.paired_difference(per, maj))
    return out


def _compare(result: dict, curve: str) -> str:
    k = str(result["n"])
    (a, sa), (m, _) = result["curves"][curve][k], result["curves"]["majority"][k]
    d, se = result["vs_majority"][curve]
    word = "beats" if d > 2 * se else ("loses to" if d < -2 * se else "does not separate from")
    return f"{curve} Best-of-{k} {a:.1f} ± {sa:.1f} {word} majority vote {m:.1f} (paired difference {d:+.1f} ± {se:.1f})"


def verdict(result: dict) -> str:
    """The SWIFT heads against majority vote at k = N, with paired standard errors: the first
    variant (the config's primary, e.g. the paper's all-layer features) under Best-of-N, the
    variant with the lowest validation loss on the train split, and the best variant x rule on
    the test set (chosen after the fact, so optimistic)."""
    k = str(result["n"])
    variants = list(result["variants"])
    parts = [_compare(result, f"{variants[0]}/best")]
    losses = {v: result["variants"][v].get("best_val_loss") for v in variants}
    losses = {v: x for v, x in losses.items() if x is not None and np.isfinite(x)}
    if losses:
        by_val = min(losses, key=losses.get)
        if by_val != variants[0]:
            parts.append("lowest validation loss: " + _compare(result, f"{by_val}/best"))
    best = max(result["vs_majority"], key=lambda c: result["curves"][c][k][0])
    if best != f"{variants[0]}/best":
        parts.append("best on the test set (chosen after the fact): " + _compare(result, best))
    return "; ".join(parts) + f"; oracle {result['curves']['oracle'][k][0]:.1f}, pass@1 {result['pass@1']:.1f}"


def markdown(result: dict) -> str:
    """The study as a markdown table: accuracy ± standard error at each k, one line per curve."""
    ks = [str(k) for k in result["ks"]]
    lines = ["| score / rule | " + " | ".join(f"@{k}" for k in ks) + " |",
             "| --- | " + " | ".join("---:" for _ in ks) + " |"]
    for c, vals in result["curves"].items():
        lines.append(f"| {c} | " + " | ".join(f"{vals[k][0]:.1f} ± {vals[k][1]:.1f}" for k in ks) + " |")
    lines.append("")
    n = str(result["n"])
    lines.append(f"| variant | F | head params | lr | epochs | best val loss | train s | best @{n} | weighted @{n} "
                 f"| Borda @{n} |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, v in result["variants"].items():
        loss = v.get("best_val_loss")
        at_n = " | ".join("{:.1f} ± {:.1f}".format(*result["curves"][f"{name}/{r}"][n])
                          for r in ("best", "weighted", "borda"))
        lines.append(f"| {name} | {v['feature_dim']} | {v.get('num_params', '')} | {v.get('lr', '')} | "
                     f"{v.get('epochs_run', 0):.1f} | {'' if loss is None else f'{loss:.4f}'} | "
                     f"{v.get('train_seconds', '')} | {at_n} |")
    lines.append("")
    rules = selection_mod.SCORED_RULES
    lines.append(f"| vs majority vote @{result['n']}, paired (points) | " + " | ".join(rules) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in rules) + " |")
    for name in result["variants"]:
        lines.append(f"| {name} | " + " | ".join("{:+.1f} ± {:.1f}".format(*result["vs_majority"][f"{name}/{r}"])
                                                for r in rules) + " |")
    lines.append("")
    lines.append(f"{result['n_test_problems']} test problems, {result['n_train_problems']} train problems, "
                 f"N = {result['n']}. {result['verdict']}.")
    return "\n".join(lines)


def main(argv) -> int:
    """``swiftjax swift study CONFIG [k=v ...]``"""
    cfg = parse_typed(SwiftStudyConfig, argv, "swift study")
    with use_mesh(cfg.mesh):
        result = run_study(cfg)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
