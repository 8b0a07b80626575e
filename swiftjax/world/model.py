"""The embedded world's model: train a small Llama on arithmetic word problems with the
generic optax loop and export it as an HF directory (then it is a Backbone like any other:
``model: world`` in a config, or the exported directory's path).

    swiftjax world train  [configs/world.yaml] [key=value ...]
    swiftjax world export [configs/world.yaml] [key=value ...]   # checkpoint -> HF directory

The default trained model ships in the package (``swiftjax/assets/world_model``); ``world
train`` with the default config regenerates it bit for bit on the same software stack.
Candidates are sampled like any model's: ``swiftjax sample configs/demo.yaml``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._io import file_sha256
from swiftjax.backbone import WORLD_MODEL_DIR
from swiftjax.batching import epoch_batches
from swiftjax.config import parse_typed, subcommand, to_plain
from swiftjax.logprobs import sft_loss
from swiftjax.models.config import ModelConfig
from swiftjax.models.load import load_model, save_model
from swiftjax.models.registry import create_model
from swiftjax.train import ckpt, loop, metrics
from swiftjax.world import problems as world
from swiftjax.world import tokenizer as wtok

ASSET_DIR = WORLD_MODEL_DIR


@dataclasses.dataclass(frozen=True)
class WorldData:
    n_train: int = 76800      # 1200 steps x 64: one epoch
    n_val: int = 512
    max_len: int = 96


@dataclasses.dataclass(frozen=True)
class WorldArch:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    max_position_embeddings: int = 256


@dataclasses.dataclass(frozen=True)
class WorldTrain:
    batch_size: int = 64
    max_steps: int = 1200
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 400
    ckpt_every: int = 400


@dataclasses.dataclass(frozen=True)
class WorldModelConfig:
    """Every default of the world model's recipe (the shipped model's); YAML only overrides."""

    seed: int = 0
    out: str = "runs/world"
    world: world.WorldConfig = world.WorldConfig()
    data: WorldData = WorldData()
    model: WorldArch = WorldArch()
    train: WorldTrain = WorldTrain()


def model_config(arch: WorldArch, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=arch.hidden_size, num_layers=arch.num_layers,
        num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.hidden_size // arch.num_heads,
        intermediate_size=arch.intermediate_size, rope_theta=float(arch.rope_theta),
        max_position_embeddings=arch.max_position_embeddings, norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=wtok.BOS_ID, eos_token_id=(wtok.END_ID, wtok.EOS_ID), pad_token_id=wtok.PAD_ID,
    )


def encode_split(tok, problems, max_len: int) -> dict[str, np.ndarray]:
    ids, attn, resp = wtok.encode_examples(tok, [p.question for p in problems],
                                           [p.solution for p in problems], max_len)
    return {"ids": np.asarray(ids), "attention_mask": np.asarray(attn), "response_mask": np.asarray(resp)}


# --------------------------------------------------------------------------- train
def train(cfg: WorldModelConfig, *, progress: bool = True) -> Path:
    """Train the world model; returns the exported HF directory (``{out}/model``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = wtok.build_tokenizer()
    dcfg = cfg.data
    t0 = time.time()
    train_set = encode_split(tok, world.make_split("train", dcfg.n_train, cfg.world, seed=cfg.seed), dcfg.max_len)
    val_set = encode_split(tok, world.make_split("validation", dcfg.n_val, cfg.world, seed=cfg.seed), dcfg.max_len)
    mcfg = model_config(cfg.model, tok.get_vocab_size())
    model = create_model(mcfg, seed=cfg.seed)
    tcfg = cfg.train
    opt = loop.OptimizerConfig(name="adamw", lr=tcfg.lr, weight_decay=tcfg.weight_decay, b2=0.98,
                               schedule="cosine", warmup_steps=tcfg.warmup_steps,
                               total_steps=tcfg.max_steps, final_lr_ratio=0.05,
                               clip_norm=tcfg.clip_norm)
    tx = loop.make_optimizer(opt)
    graphdef, params, frozen = loop.nnx_split(model)
    state = loop.init_state(params, tx, cfg.seed, frozen=frozen)
    loss_fn = loop.nnx_loss(graphdef, lambda m, b, r: sft_loss(m, b, r))
    step = loop.make_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(opt))
    val_batches = [{k: jnp.asarray(v[i:i + 128]) for k, v in val_set.items()}
                   for i in range(0, len(val_set["ids"]), 128)]
    def val_metrics(p, b, fr):
        loss, aux = loss_fn(p, b, None, fr)
        return {"loss": loss, **aux}

    eval_fn = loop.make_eval_fn(val_metrics, val_batches, frozen=frozen)
    writer = metrics.JsonlWriter(out / "metrics.jsonl")
    res = loop.fit(state, step, epoch_batches(train_set, tcfg.batch_size, cfg.seed),
                   max_steps=tcfg.max_steps, eval_fn=eval_fn, eval_every=tcfg.eval_every,
                   checkpointer=ckpt.Checkpointer(out / "ckpt", max_to_keep=2),
                   ckpt_every=tcfg.ckpt_every, writer=writer, log_every=50, progress=progress,
                   desc="world model")
    model = loop.nnx_merge(graphdef, res.state.params, res.state.frozen)  # the input frozen was donated
    final = res.history[-1] if res.history else {}
    seconds = time.time() - t0
    print(f"world model: {res.steps} steps in {seconds:.0f}s, validation {final}")
    d = export(model, mcfg, tok, out / "model", overwrite=True)
    write_manifest(d, cfg, {"train_seconds": round(seconds, 1), "validation": final})
    return d


def write_manifest(model_dir: Path, cfg: WorldModelConfig, info: dict) -> Path:
    """MANIFEST.json: sha256 of every file, the full config and how to regenerate the model."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "regenerate": "swiftjax world train configs/world.yaml  # then copy runs/world/model here",
        "sha256": {p.name: file_sha256(p) for p in files},
        "config": to_plain(cfg),
        "software": {"jax": jax.__version__, "python": sys.version.split()[0]},
        **info,
    }
    path = model_dir / "MANIFEST.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def export(model, mcfg: ModelConfig, tok, path: Path, overwrite: bool = False) -> Path:
    """An HF directory transformers loads: config, safetensors, tokenizer, generation config."""
    with tempfile.TemporaryDirectory() as td:
        wtok.save_tokenizer(tok, td)
        extra = {p.name: p.read_bytes() for p in Path(td).iterdir()}
    extra["generation_config.json"] = json.dumps({
        "bos_token_id": wtok.BOS_ID, "eos_token_id": [wtok.END_ID, wtok.EOS_ID],
        "pad_token_id": wtok.PAD_ID}, indent=2)
    return save_model(model, mcfg, path, overwrite=overwrite, extra_files=extra)


def export_from_checkpoint(cfg: WorldModelConfig) -> Path:
    out = Path(cfg.out)
    tok = wtok.build_tokenizer()
    mcfg = model_config(cfg.model, tok.get_vocab_size())
    model = create_model(mcfg, seed=cfg.seed)
    graphdef, params, frozen = loop.nnx_split(model)
    tx = loop.make_optimizer(loop.OptimizerConfig(name="adamw", lr=1e-3))
    target = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
              "rng": jax.random.PRNGKey(0)}
    restored = ckpt.Checkpointer(out / "ckpt").restore(target)
    if restored is None:
        raise ValueError(f"world export: expected a checkpoint under {out / 'ckpt'}, found none")
    model = loop.nnx_merge(graphdef, restored.state["params"], frozen)
    return export(model, mcfg, tok, out / "model", overwrite=True)


def load_world_model(path: Path | str | None = None):
    """(model, config, tokenizer) of a world-model directory (default: the shipped one)."""
    path = Path(path) if path else ASSET_DIR
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"world model: expected an HF directory with model.safetensors at {path}; "
                         "run `swiftjax world train` first")
    model, mcfg = load_model(path)
    return model, mcfg, wtok.load_tokenizer(path)




def model_digest(model_dir) -> str:
    """sha256 of a model directory's weights: what caches of its outputs are keyed by."""
    return file_sha256(Path(model_dir) / "model.safetensors")


def _train_main(argv) -> int:
    d = train(parse_typed(WorldModelConfig, argv, "world train"))
    print(f"exported {d} (model.safetensors sha256 {model_digest(d)[:16]})")
    return 0


def _export_main(argv) -> int:
    print(export_from_checkpoint(parse_typed(WorldModelConfig, argv, "world export")))
    return 0


def main(argv) -> int:
    """``swiftjax world train|export [CONFIG] [k=v ...]``."""
    return subcommand("world", {"train": _train_main, "export": _export_main}, argv)
