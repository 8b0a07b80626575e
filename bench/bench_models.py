"""Forward with all hidden states and greedy decoding: swiftjax (jit, float32) vs
transformers' PyTorch model on the same weights, in one process.

    python bench/bench_models.py [--small]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import report, timeit  # noqa: E402

import swiftjax  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402


def make_model(layers, d, vocab, tmp):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(d * 8 / 3) // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=d // 64,
                                   num_key_value_heads=d // 64, max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval().float()
    hf.save_pretrained(tmp)
    model, _ = swiftjax.load_model(tmp)
    return hf, model


def bench_forward(hf, model, batch, seq, vocab):
    ids = np.random.RandomState(0).randint(3, vocab, size=(batch, seq))
    gd, st = nnx.split(model)

    @jax.jit
    def fwd(st, x):
        out = nnx.merge(gd, st)(x, output_hidden_states=True)
        return out.logits, out.hidden_states

    x = jnp.asarray(ids)
    t_jax = timeit(lambda: jax.block_until_ready(fwd(st, x)), warmup=1, repeats=5)
    tx = torch.tensor(ids)

    def torch_fwd():
        with torch.inference_mode():
            hf(tx, output_hidden_states=True)

    t_pt = timeit(torch_fwd, warmup=1, repeats=5)
    toks = batch * seq
    return {"swiftjax_tok_s": toks / t_jax, "torch_tok_s": toks / t_pt, "ratio": t_pt / t_jax}


def bench_decode(hf, model, batch, prompt, new, vocab):
    rs = np.random.RandomState(1)
    ids = rs.randint(3, vocab, size=(batch, prompt))
    cfg = SamplingConfig(max_new_tokens=new, temperature=0, eos_ids=())
    t_jax = timeit(lambda: jax.block_until_ready(generate(model, ids, cfg=cfg).tokens), warmup=1, repeats=3)
    tx = torch.tensor(ids)

    def torch_gen():
        with torch.inference_mode():
            hf.generate(tx, attention_mask=torch.ones_like(tx), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    t_pt = timeit(torch_gen, warmup=1, repeats=3)
    toks = batch * new
    return {"swiftjax_tok_s": toks / t_jax, "torch_tok_s": toks / t_pt, "ratio": t_pt / t_jax}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a quick smoke-size run")
    args = ap.parse_args(argv)
    layers, d, vocab, batch, seq = (2, 128, 1000, 2, 64) if args.small else (8, 512, 32000, 8, 256)
    new = 16 if args.small else 128
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); Llama L={layers} d={d} V={vocab}")
    with tempfile.TemporaryDirectory() as tmp:
        hf, model = make_model(layers, d, vocab, tmp)
        r = bench_forward(hf, model, batch, seq, vocab)
        report(f"forward + all hidden states, batch {batch} x {seq}, float32", [r])
        r = bench_decode(hf, model, batch, 32, new, vocab)
        report(f"greedy decoding, batch {batch}, prompt 32, {new} new tokens", [r])


if __name__ == "__main__":
    main()
