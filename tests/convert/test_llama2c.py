"""llama2.c -> Hugging Face conversion, checked on the real stories260K model.

References written here, independent of swiftjax.convert: a byte-offset parser of the .bin, a
numpy forward pass that follows llama2.c's run.c (interleaved-pair RoPE on the unpermuted
weights, one position at a time with a KV cache), and llama2.c's score-greedy BPE encoder.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from swiftjax.convert.llama2c import (
    convert_llama2c,
    main_convert,
    permute_rope_rows,
    read_llama2c_checkpoint,
    read_llama2c_tokenizer,
)
from swiftjax.data.paths import data_dir

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside.\n"
    "One day, she saw a big, red ball in the park! \"Can I play?\" she asked her mom."
)
TEXTS = [
    "Once upon a time",
    STORY,
    "Tom and Sue went to the zoo.  They saw a lion, a monkey and 3 birds.",
    "The café señor said: 100% ñ ok ~ [x] \U0001F600 done.",
]


def _model_dir() -> Path:
    d = data_dir()
    m = d / "models" / "stories260K" if d is not None else None
    if m is None or not (m / "stories260K.bin").is_file() or not (m / "tok512.bin").is_file():
        pytest.skip("real data absent: ../shared/data/models/stories260K (or $SWIFTJAX_DATA) not found")
    return m


@pytest.fixture(scope="module")
def src() -> tuple[Path, Path]:
    m = _model_dir()
    return m / "stories260K.bin", m / "tok512.bin"


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("conv") / "stories260K-hf"
    convert_llama2c(src[0], src[1], dst)
    return dst


@pytest.fixture(scope="module")
def hf_model(converted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        converted, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    return model, info


# ------------------------------------------------------------------ independent references


def _parse_bin(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """Walk llama2.c's legacy layout by offsets (run.c's memory_map_weights)."""
    raw = path.read_bytes()
    dim, hid, n_l, n_h, n_kv, vocab, seq = struct.unpack("<7i", raw[:28])
    hs = dim // n_h
    kv = n_kv * hs
    f = np.frombuffer(raw, "<f4", offset=28)
    out, p = {}, 0

    def take(name, *shape):
        nonlocal p
        n = int(np.prod(shape))
        out[name] = f[p : p + n].reshape(shape).astype(np.float32)
        p += n

    take("emb", abs(vocab), dim)
    take("rms_att", n_l, dim)
    take("wq", n_l, dim, dim)
    take("wk", n_l, kv, dim)
    take("wv", n_l, kv, dim)
    take("wo", n_l, dim, dim)
    take("rms_ffn", n_l, dim)
    take("w1", n_l, hid, dim)
    take("w2", n_l, dim, hid)
    take("w3", n_l, hid, dim)
    take("rms_final", dim)
    take("fcr", seq, hs // 2)
    take("fci", seq, hs // 2)
    out["wcls"] = out["emb"] if vocab > 0 else f[p:].reshape(-vocab, dim)
    return (dim, hid, n_l, n_h, n_kv, vocab, seq), out


def _rmsnorm(x, w):
    return x / np.sqrt(np.mean(x * x) + 1e-5) * w


def _run_c_forward(hdr, w, tokens) -> np.ndarray:
    """llama2.c run.c forward, position by position, float64 accumulate: logits [T, V]."""
    dim, hid, n_l, n_h, n_kv, vocab, seq = hdr
    hs = dim // n_h
    kv_dim = n_kv * hs
    kv_mul = n_h // n_kv
    w = {k: v.astype(np.float64) for k, v in w.items()}
    kc = np.zeros((n_l, len(tokens), kv_dim))
    vc = np.zeros((n_l, len(tokens), kv_dim))
    logits = []
    for pos, tok in enumerate(tokens):
        x = w["emb"][tok].copy()
        for l in range(n_l):
            xb = _rmsnorm(x, w["rms_att"][l])
            q = w["wq"][l] @ xb
            k = w["wk"][l] @ xb
            v = w["wv"][l] @ xb
            for i in range(0, dim, 2):  # RoPE on pairs (i, i+1), as run.c
                freq = 1.0 / 10000.0 ** ((i % hs) / hs)
                c, s = np.cos(pos * freq), np.sin(pos * freq)
                vecs = (q, k) if i < kv_dim else (q,)
                for vec in vecs:
                    a, b = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = a * c - b * s, a * s + b * c
            kc[l, pos], vc[l, pos] = k, v
            att_out = np.zeros(dim)
            for h in range(n_h):
                qh = q[h * hs : (h + 1) * hs]
                kvh = (h // kv_mul) * hs
                sc = kc[l, : pos + 1, kvh : kvh + hs] @ qh / np.sqrt(hs)
                sc = np.exp(sc - sc.max())
                sc /= sc.sum()
                att_out[h * hs : (h + 1) * hs] = sc @ vc[l, : pos + 1, kvh : kvh + hs]
            x = x + w["wo"][l] @ att_out
            xb = _rmsnorm(x, w["rms_ffn"][l])
            h1 = w["w1"][l] @ xb
            h3 = w["w3"][l] @ xb
            x = x + w["w2"][l] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        logits.append(w["wcls"] @ _rmsnorm(x, w["rms_final"]))
    return np.stack(logits)


def _parse_tok(path: Path, n: int) -> tuple[list[bytes], list[float]]:
    raw = path.read_bytes()
    p, pieces, scores = 4, [], []
    for _ in range(n):
        s, ln = struct.unpack_from("<fi", raw, p)
        pieces.append(raw[p + 8 : p + 8 + ln])
        scores.append(s)
        p += 8 + ln
    return pieces, scores


def _run_c_encode(pieces, scores, text: str) -> list[int]:
    """llama2.c's encode(): dummy prefix ' ', UTF-8 chars or byte fallback, then merge best-score pairs."""
    lookup = {p: i for i, p in enumerate(pieces)}
    ids = [lookup[b" "]] if text else []
    for ch in text:
        bs = ch.encode("utf-8")
        if bs in lookup:
            ids.append(lookup[bs])
        else:
            ids.extend(b + 3 for b in bs)
    while True:
        best, best_i = -1e10, -1
        for i in range(len(ids) - 1):
            j = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if j is not None and scores[j] > best:
                best, best_i, best_id = scores[j], i, j
        if best_i < 0:
            return ids
        ids[best_i : best_i + 2] = [best_id]


# ------------------------------------------------------------------ reading


def test_checkpoint_layout(src):
    hdr, w = read_llama2c_checkpoint(src[0])
    dim, hid, n_l, n_h, n_kv, vocab, seq = struct.unpack("<7i", src[0].read_bytes()[:28])
    assert (hdr["dim"], hdr["hidden_dim"], hdr["n_layers"], hdr["n_heads"]) == (dim, hid, n_l, n_h)
    assert (hdr["n_kv_heads"], hdr["vocab_size"], hdr["seq_len"]) == (n_kv, abs(vocab), seq)
    assert (dim, hid, n_l, n_h, n_kv, vocab, seq) == (64, 172, 5, 8, 4, 512, 512)  # data README
    assert hdr["shared_classifier"] and hdr["has_rope_tables"] and "wcls" not in w
    _, ref = _parse_bin(src[0])
    names = {"emb": "token_embedding", "fcr": "freq_cis_real", "fci": "freq_cis_imag"}
    for k, v in ref.items():
        if k != "wcls":
            got = w[names.get(k, k)]
            assert got.dtype == np.float32 and got.shape == v.shape, k
            np.testing.assert_array_equal(got, v, err_msg=k)
    # The RoPE tables sit where the layout says iff they hold cos/sin(t * theta^(-2i/hs)).
    hs = dim // n_h
    ang = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)[None, :]
    np.testing.assert_allclose(w["freq_cis_real"], np.cos(ang), atol=1e-4)
    np.testing.assert_allclose(w["freq_cis_imag"], np.sin(ang), atol=1e-4)


@pytest.mark.parametrize("cut", [0, 10, 28, 1000, 4])
def test_truncated_bin_raises(src, tmp_path, cut):
    raw = src[0].read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw[:cut] if cut < 28 else raw[:-cut])
    with pytest.raises(ValueError, match="bytes"):
        read_llama2c_checkpoint(bad)


def test_extra_bytes_and_bad_header_raise(src, tmp_path):
    raw = src[0].read_bytes()
    (tmp_path / "long.bin").write_bytes(raw + b"\0" * 8)
    with pytest.raises(ValueError, match="sizes disagree"):
        read_llama2c_checkpoint(tmp_path / "long.bin")
    (tmp_path / "hdr.bin").write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + raw[28:])
    with pytest.raises(ValueError, match="n_heads"):
        read_llama2c_checkpoint(tmp_path / "hdr.bin")
    with pytest.raises(ValueError, match="missing"):
        read_llama2c_checkpoint(tmp_path / "nope.bin")


def test_permute_rope_rows_matches_index_list():
    rng = np.random.default_rng(0)
    n_heads, hd, d = 3, 6, 5
    w = rng.standard_normal((n_heads * hd, d)).astype(np.float32)
    order = [h * hd + j for h in range(n_heads) for j in list(range(0, hd, 2)) + list(range(1, hd, 2))]
    np.testing.assert_array_equal(permute_rope_rows(w, n_heads), w[order])
    with pytest.raises(ValueError):
        permute_rope_rows(w[:-1], n_heads)


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_llama2c_encoder(src):
    tok = read_llama2c_tokenizer(src[1], 512)
    pieces, scores = _parse_tok(src[1], 512)
    for text in TEXTS:
        want = _run_c_encode(pieces, scores, text)
        got = tok.encode(text).ids
        assert got[0] == 1 and got[1:] == want, text
        assert tok.decode(got, skip_special_tokens=True) == text
    ids = tok.encode("Once upon a time").ids
    # Each token's llama2.c bytes, concatenated, are the text with its dummy prefix.
    assert b"".join(pieces[i] for i in ids[1:]) == b" Once upon a time"
    assert len(ids) <= 6  # whole-word pieces, not characters


def test_tokenizer_bad_inputs(src, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        read_llama2c_tokenizer(src[1], 500)
    with pytest.raises(ValueError, match="truncated"):
        read_llama2c_tokenizer(src[1], 600)
    (tmp_path / "t.bin").write_bytes(src[1].read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_llama2c_tokenizer(tmp_path / "t.bin", 512)


def test_autotokenizer_loads_and_round_trips(converted, src):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == 512
    pieces, scores = _parse_tok(src[1], 512)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [1] + _run_c_encode(pieces, scores, text)
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok("Once upon a time")["input_ids"]) == [
        "<s>", "\u2581Once", "\u2581upon", "\u2581a", "\u2581time",
    ]


# ------------------------------------------------------------------ converted model


def test_converted_files_and_config(converted):
    from safetensors import safe_open

    names = sorted(p.name for p in converted.iterdir())
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        assert f in names
    assert not any(p.name.startswith(".") for p in converted.parent.iterdir())  # no temp leftovers
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] == 172
    assert cfg["num_hidden_layers"] == 5 and cfg["num_attention_heads"] == 8
    assert cfg["num_key_value_heads"] == 4 and cfg["vocab_size"] == 512
    assert cfg["max_position_embeddings"] == 512 and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    with safe_open(str(converted / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == np.float32 for k in keys)
    assert "lm_head.weight" not in keys and len(keys) == 2 + 9 * 5


def test_transformers_loads_without_missing_keys(hf_model):
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logits_match_run_c_reference(hf_model, src):
    torch = pytest.importorskip("torch")
    model, _ = hf_model
    hdr, w = _parse_bin(src[0])
    tokens = [1, 403, 407, 261, 378, 11, 350, 280, 261, 300, 70, 305]
    want = _run_c_forward(hdr, w, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].numpy()
    diff = float(np.max(np.abs(got - want)))
    print(f"max |logit diff| run.c-numpy vs transformers: {diff:.3g}")
    assert diff < 1e-4


def test_greedy_generation_is_the_lily_story(hf_model, converted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _ = hf_model
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    print(f"greedy: {text!r}")
    assert text.startswith("Once upon a time, there was a little girl named Lily")


def test_swiftjax_logits_match_transformers(hf_model, converted, src):
    """swiftjax's Flax port on the converted folder; skipped until swiftjax.models.load exists.

    Tolerance: both float32 forwards differ from the float64 run.c reference by up to ~1.8e-5
    (logits reach |19|; the error is hidden-state rounding spread through lm_head, so it does not
    shrink for small logits). A 1e-5 bound sits below that float32 noise: 3e-5 is used against
    transformers, and 1e-4 against the float64 run.c reference (the bound transformers meets).
    """
    pytest.importorskip("swiftjax.models.load")
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    import swiftjax

    model, _ = hf_model
    tokens = [1, 403, 407, 261, 378, 11, 350, 280, 261, 300, 70, 305]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    sj, _ = swiftjax.load_model(converted)
    got = np.asarray(sj(jnp.asarray([tokens], dtype=jnp.int32)).logits)[0]
    print(f"max |logit diff| swiftjax vs transformers: {np.max(np.abs(got - want)):.3g}")
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=0)
    hdr, w = _parse_bin(src[0])
    assert np.max(np.abs(got - _run_c_forward(hdr, w, tokens))) < 1e-4


# ------------------------------------------------------------------ destination handling and CLI


def test_existing_nonempty_destination_refused_then_overwritten(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_llama2c(src[0], src[1], dst)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    convert_llama2c(src[0], src[1], dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_failed_conversion_leaves_nothing(src, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(src[0].read_bytes()[:-100])
    with pytest.raises(ValueError):
        convert_llama2c(bad, src[1], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin"]


def test_main_convert_from_folder(src, tmp_path):
    assert main_convert(["llama2c", str(src[0].parent), str(tmp_path / "a")]) == 0
    assert main_convert([str(src[0]), str(tmp_path / "b"), "--tokenizer", str(src[1])]) == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not empty"):
        main_convert([str(src[0]), str(tmp_path / "a")])
    assert main_convert([str(src[0]), str(tmp_path / "a"), "--overwrite"]) == 0


def test_swiftjax_greedy_decoding_reproduces_the_story(converted):
    """swiftjax's own KV-cache decoder, greedy from BOS, tells llama2.c's reference opening."""
    import transformers

    import swiftjax
    from swiftjax.sampling import SamplingConfig, generate

    sj, cfg = swiftjax.load_model(converted)
    out = generate(sj, np.array([[1]], np.int32),
                   cfg=SamplingConfig(max_new_tokens=40, temperature=0, eos_ids=(2,)))
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    text = tok.decode(np.asarray(out.tokens)[0], skip_special_tokens=True)
    print(f"swiftjax greedy: {text!r}")
    assert text.startswith("Once upon a time, there was a little girl named Lily")


def test_swift_pipeline_runs_on_the_converted_stories_model(converted, tmp_path):
    """The llama2.c model is a base model without a chat template: a plain template and a jsonl
    task with the exact grader take it through sample -> features -> head -> fused scores -> BoN."""
    import json as _json

    from swiftjax.backbone import load_backbone
    from swiftjax.config import parse_typed
    from swiftjax.methods.swift import pipeline

    data = tmp_path / "stories.jsonl"
    with data.open("w") as f:
        for i, (q, a) in enumerate([("Once upon a time", "Lily"), ("One day", "Tom"), ("The sun", "was"),
                                    ("A little girl", "saw"), ("The dog", "ran"), ("Mom said", "yes")]):
            f.write(_json.dumps({"question": q, "answer": a, "id": f"s{i}"}) + "\n")
    with pytest.raises(ValueError, match="no chat template"):
        load_backbone(converted)
    cfg = parse_typed(pipeline.SwiftRunConfig, [
        f"model={converted}", "template=plain", "task.name=jsonl", f"task.test_path={data}", "task.id_field=id",
        "task.grader=exact", "task.n_test=2", "task.n_train=4", f"out={tmp_path / 'out'}", "n=4",
        "rollouts_per_group=4", "sampling.max_new_tokens=8", "sampling.batch_size=8", "swift.max_epochs=2",
        "swift.groups_per_batch=1", "extract_batch=8", "progress=false"], "test")
    res = pipeline.run(cfg, report=False)
    assert set(res["bon"]) == {"random", "majority", "swift", "oracle"}
    assert res["model"]["template"] == "plain" and res["n_test_problems"] == 2
    rows = [_json.loads(line) for line in next((tmp_path / "out").glob("candidates_test_*.jsonl")).open()]
    assert all(r["prompt"] in ("Once upon a time", "One day") for r in rows)
