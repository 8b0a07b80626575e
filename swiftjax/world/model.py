"""The embedded world end to end: train a small Llama on arithmetic word problems with the
generic optax loop, export it as an HF directory, and sample N candidates per problem.

    swiftjax world train  [configs/world.yaml] [key=value ...]
    swiftjax world export [configs/world.yaml] [key=value ...]   # checkpoint -> HF directory
    swiftjax world sample [configs/world.yaml] [key=value ...]   # -> candidates jsonl
    swiftjax world eval   [configs/world.yaml] [key=value ...]   # pass@1 / oracle@N summary

The default trained model ships in the package (``swiftjax/assets/world_model``); ``world
train`` with the default config regenerates it bit for bit on the same software stack.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax import bon
from swiftjax.config import config_from_argv, to_dataclass
from swiftjax.data import candidates as cands
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.sampling import SamplingConfig, generate
from swiftjax.models.config import ModelConfig

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "world_model"

DEFAULTS = {
    "seed": 0,
    "out": "runs/world",
    "world": {},  # WorldConfig fields
    "data": {"n_train": 76800, "n_val": 512, "max_len": 96},
    "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
              "intermediate_size": 384, "rope_theta": 10000.0, "max_position_embeddings": 256},
    "train": {"batch_size": 64, "max_steps": 1200, "lr": 3e-3, "warmup_steps": 100,
              "weight_decay": 0.1, "clip_norm": 1.0, "eval_every": 400, "ckpt_every": 400},
    "sample": {"model": None, "split": "test", "n_problems": 300, "n": 16, "temperature": 1.0,
               "top_p": 1.0, "top_k": 0, "max_new_tokens": 64, "prompt_len": 64, "batch_size": 512,
               "seed": 0, "out": None},
}


def world_config(cfg: dict) -> world.WorldConfig:
    return to_dataclass(world.WorldConfig, cfg.get("world"), "world")


def model_config(cfg: dict, vocab_size: int) -> ModelConfig:
    m = dict(cfg["model"])
    heads = m.pop("num_heads")
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=m.pop("hidden_size"),
        num_layers=m.pop("num_layers"), num_heads=heads, num_kv_heads=m.pop("num_kv_heads"),
        head_dim=cfg["model"]["hidden_size"] // heads, intermediate_size=m.pop("intermediate_size"),
        rope_theta=float(m.pop("rope_theta")), max_position_embeddings=m.pop("max_position_embeddings"),
        norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=wtok.BOS_ID,
        eos_token_id=(wtok.END_ID, wtok.EOS_ID), pad_token_id=wtok.PAD_ID,
        **m,
    )


def encode_split(tok, problems, max_len: int) -> dict[str, np.ndarray]:
    ids, attn, resp = wtok.encode_examples(tok, [p.question for p in problems],
                                           [p.solution for p in problems], max_len)
    return {"ids": np.asarray(ids), "attention_mask": np.asarray(attn), "response_mask": np.asarray(resp)}


# --------------------------------------------------------------------------- train
def train(cfg: dict, *, progress: bool = True) -> Path:
    """Train the world model; returns the exported HF directory (``{out}/model``)."""
    from swiftjax.batching import epoch_batches
    from swiftjax.logprobs import sft_loss
    from swiftjax.models.registry import create_model
    from swiftjax.train import ckpt, loop, metrics

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    wcfg = world_config(cfg)
    tok = wtok.build_tokenizer()
    dcfg = cfg["data"]
    t0 = time.time()
    train_set = encode_split(tok, world.make_split("train", dcfg["n_train"], wcfg, seed=cfg["seed"]), dcfg["max_len"])
    val_set = encode_split(tok, world.make_split("validation", dcfg["n_val"], wcfg, seed=cfg["seed"]), dcfg["max_len"])
    mcfg = model_config(cfg, tok.get_vocab_size())
    model = create_model(mcfg, seed=cfg["seed"])
    tcfg = cfg["train"]
    opt = loop.OptimizerConfig(name="adamw", lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], b2=0.98,
                               schedule="cosine", warmup_steps=tcfg["warmup_steps"],
                               total_steps=tcfg["max_steps"], final_lr_ratio=0.05,
                               clip_norm=tcfg["clip_norm"])
    tx = loop.make_optimizer(opt)
    graphdef, params, frozen = loop.nnx_split(model)
    state = loop.init_state(params, tx, cfg["seed"], frozen=frozen)
    loss_fn = loop.nnx_loss(graphdef, lambda m, b, r: sft_loss(m, b, r))
    step = loop.make_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(opt))
    val_batches = [{k: jnp.asarray(v[i:i + 128]) for k, v in val_set.items()}
                   for i in range(0, len(val_set["ids"]), 128)]
    def val_metrics(p, b, fr):
        loss, aux = loss_fn(p, b, None, fr)
        return {"loss": loss, **aux}

    eval_fn = loop.make_eval_fn(val_metrics, val_batches, frozen=frozen)
    writer = metrics.JsonlWriter(out / "metrics.jsonl")
    res = loop.fit(state, step, epoch_batches(train_set, tcfg["batch_size"], cfg["seed"]),
                   max_steps=tcfg["max_steps"], eval_fn=eval_fn, eval_every=tcfg["eval_every"],
                   checkpointer=ckpt.Checkpointer(out / "ckpt", max_to_keep=2),
                   ckpt_every=tcfg["ckpt_every"], writer=writer, log_every=50, progress=progress,
                   desc="world model")
    model = loop.nnx_merge(graphdef, res.state.params, res.state.frozen)  # the input frozen was donated
    final = res.history[-1] if res.history else {}
    seconds = time.time() - t0
    print(f"world model: {res.steps} steps in {seconds:.0f}s, validation {final}")
    d = export(model, mcfg, tok, out / "model", overwrite=True)
    write_manifest(d, cfg, {"train_seconds": round(seconds, 1), "validation": final})
    return d


def write_manifest(model_dir: Path, cfg: dict, info: dict) -> Path:
    """MANIFEST.json: sha256 of every file, the full config and how to regenerate the model."""
    import jax as _jax

    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "regenerate": "swiftjax world train configs/world.yaml  # then copy runs/world/model here",
        "sha256": {p.name: file_digest(p) for p in files},
        "config": cfg,
        "software": {"jax": _jax.__version__, "python": sys.version.split()[0]},
        **info,
    }
    path = model_dir / "MANIFEST.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def export(model, mcfg: ModelConfig, tok, path: Path, overwrite: bool = False) -> Path:
    """An HF directory transformers loads: config, safetensors, tokenizer, generation config."""
    import tempfile

    from swiftjax.models.load import save_model

    with tempfile.TemporaryDirectory() as td:
        wtok.save_tokenizer(tok, td)
        extra = {p.name: p.read_bytes() for p in Path(td).iterdir()}
    extra["generation_config.json"] = json.dumps({
        "bos_token_id": wtok.BOS_ID, "eos_token_id": [wtok.END_ID, wtok.EOS_ID],
        "pad_token_id": wtok.PAD_ID}, indent=2)
    return save_model(model, mcfg, path, overwrite=overwrite, extra_files=extra)


def export_from_checkpoint(cfg: dict) -> Path:
    from swiftjax.models.registry import create_model
    from swiftjax.train import ckpt, loop

    out = Path(cfg["out"])
    tok = wtok.build_tokenizer()
    mcfg = model_config(cfg, tok.get_vocab_size())
    model = create_model(mcfg, seed=cfg["seed"])
    graphdef, params, frozen = loop.nnx_split(model)
    tx = loop.make_optimizer(loop.OptimizerConfig(name="adamw", lr=1e-3))
    target = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
              "rng": jax.random.PRNGKey(0)}
    restored = ckpt.Checkpointer(out / "ckpt").restore(target)
    if restored is None:
        raise ValueError(f"world export: expected a checkpoint under {out / 'ckpt'}, found none")
    model = loop.nnx_merge(graphdef, restored.state["params"], frozen)
    return export(model, mcfg, tok, out / "model", overwrite=True)


# --------------------------------------------------------------------------- sample
def default_model_dir(cfg: dict | None = None) -> Path:
    if cfg and cfg.get("sample", {}).get("model"):
        return Path(cfg["sample"]["model"])
    return ASSET_DIR


def load_world_model(path: Path | str | None = None):
    """(model, config, tokenizer) of a world-model directory (default: the shipped one)."""
    import swiftjax

    path = Path(path) if path else ASSET_DIR
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"world model: expected an HF directory with model.safetensors at {path}; "
                         "run `swiftjax world train` first")
    model, mcfg = swiftjax.load_model(path)
    return model, mcfg, wtok.load_tokenizer(path)


def sample_candidates(model, tok, problems, *, n: int, temperature: float, top_p: float = 1.0,
                      top_k: int = 0, max_new_tokens: int = 64, prompt_len: int = 64,
                      batch_size: int = 512, seed: int = 0, progress: bool = True) -> list[dict]:
    """N sampled solutions per problem as candidate rows (generation order = index).

    Rows are decoded in fixed [batch_size, prompt_len] batches so one compilation serves all.
    Candidate j of problem i comes from key fold_in(seed, i * n + j)'s batch, so results
    do not depend on how many problems are sampled together.
    """
    from tqdm.auto import tqdm

    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_ids=(wtok.END_ID, wtok.EOS_ID), pad_id=wtok.PAD_ID)
    questions = [p.question for p in problems for _ in range(n)]
    ids, mask = wtok.encode_prompts(tok, questions, prompt_len)
    ids, mask = np.asarray(ids), np.asarray(mask)
    total = len(questions)
    tokens = np.zeros((total, max_new_tokens), np.int32)
    base = jax.random.key(seed)
    bar = tqdm(total=total, desc="sampling", disable=not progress, leave=False)
    for b, s in enumerate(range(0, total, batch_size)):
        e = min(s + batch_size, total)
        bi, bm = ids[s:e], mask[s:e]
        if e - s < batch_size:  # pad the last batch to the compiled shape
            bi = np.concatenate([bi, np.repeat(bi[-1:], batch_size - (e - s), 0)])
            bm = np.concatenate([bm, np.repeat(bm[-1:], batch_size - (e - s), 0)])
        out = generate(model, bi, bm, key=jax.random.fold_in(base, b), cfg=scfg)
        tokens[s:e] = np.asarray(out.tokens)[: e - s]
        bar.update(e - s)
    bar.close()
    rows = []
    for r in range(total):
        p = problems[r // n]
        resp = tokens[r]
        stop = np.flatnonzero((resp == wtok.END_ID) | (resp == wtok.EOS_ID))
        resp_ids = resp[: stop[0] + 1] if stop.size else resp
        text = wtok.decode_response(tok, resp_ids)
        ans = world.extract_answer(text)
        rows.append({"prompt_id": p.id, "index": r % n, "prompt": p.question, "text": text,
                     "token_ids": [int(t) for t in resp_ids], "answer": None if ans is None else str(ans),
                     "correct": bool(world.grade(text, p.answer)), "gold": str(p.answer)})
    return rows


def summarize(rows) -> dict:
    ids, arr = cands.group(rows)
    correct = arr["correct"]
    n = correct.shape[1]
    ks = bon.default_ks(n)
    return {"n_problems": len(ids), "n": n, "pass@1": float(correct.mean() * 100),
            "oracle": bon.oracle_at_k(correct, ks), "majority": bon.majority_at_k(arr["answers"], correct, ks)}


def sample(cfg: dict, *, progress: bool = True) -> Path:
    s = cfg["sample"]
    model, _, tok = load_world_model(default_model_dir(cfg))
    problems = world.make_split(s["split"], s["n_problems"], world_config(cfg), seed=cfg["seed"])
    t0 = time.time()
    rows = sample_candidates(model, tok, problems, n=s["n"], temperature=s["temperature"], top_p=s["top_p"],
                             top_k=s["top_k"], max_new_tokens=s["max_new_tokens"], prompt_len=s["prompt_len"],
                             batch_size=s["batch_size"], seed=s["seed"], progress=progress)
    path = Path(s["out"] or Path(cfg["out"]) / f"candidates_{s['split']}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    cands.write_candidates(path, rows)
    summ = summarize(rows)
    print(f"sampled {len(rows)} candidates in {time.time() - t0:.0f}s -> {path}")
    print(json.dumps(summ))
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_digest(model_dir) -> str:
    """sha256 of a model directory's weights: what caches of its outputs are keyed by."""
    return file_digest(Path(model_dir) / "model.safetensors")


def main(argv) -> int:
    if not argv or argv[0] not in ("train", "export", "sample", "eval"):
        print("usage: swiftjax world train|export|sample|eval [CONFIG.yaml] [key=value ...]", file=sys.stderr)
        return 2
    sub, rest = argv[0], argv[1:]
    cfg = config_from_argv(rest, DEFAULTS)
    if sub == "train":
        d = train(cfg)
        print(f"exported {d} (model.safetensors sha256 {model_digest(d)[:16]})")
    elif sub == "export":
        print(export_from_checkpoint(cfg))
    elif sub == "sample":
        sample(cfg)
    else:
        cfg["sample"]["out"] = cfg["sample"]["out"] or str(Path(cfg["out"]) / "eval_candidates.jsonl")
        sample(cfg)
    return 0


def encode_candidate_rows(tok, rows, max_len: int = 128):
    """Teacher-forced inputs for scoring candidates *as generated*: prompt ids + the sampled
    response ids (their end token included), right-padded. Returns ids, attention_mask,
    response_mask, each [N, max_len] int32."""
    n = len(rows)
    ids = np.full((n, max_len), wtok.PAD_ID, np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    cache: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        p = cache.get(r["prompt"])
        if p is None:
            p = cache[r["prompt"]] = wtok.encode(tok, wtok.format_prompt(r["prompt"]))
        toks = r.get("token_ids")
        if toks is None:
            toks = wtok.encode(tok, r["text"]) + [wtok.END_ID]
        seq = p + list(toks)
        if len(seq) > max_len:
            raise ValueError(f"candidate {r['prompt_id']}#{r['index']}: expected <= {max_len} tokens, got {len(seq)}")
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        resp[i, len(p): len(seq)] = 1
    return ids, attn, resp
