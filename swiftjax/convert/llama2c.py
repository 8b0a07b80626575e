"""Convert a llama2.c checkpoint (``model.bin`` + ``tokenizer.bin``) to a Hugging Face Llama folder.

llama2.c (karpathy/llama2.c) stores a Llama in a flat "legacy" binary: a header of seven int32
then float32 arrays, all layers of one kind together. Its tokenizer file holds the
SentencePiece-style BPE vocabulary with scores. This module reads both with numpy only and writes
a directory that ``transformers.LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load, and that :func:`swiftjax.load_model` reads without torch:
``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``.

RoPE: llama2.c rotates interleaved pairs (2i, 2i+1) of each head; HF Llama rotates the halves
(i, i + head_dim/2). Both use frequency ``theta ** (-2i / head_dim)`` for pair i, so permuting
the rows of wq and wk inside each head (even rows first, then odd rows) makes the two identical;
see :func:`permute_rope_rows`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 4 * len(_HEADER_FIELDS)
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer versioned export, not handled here.
_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


# ----------------------------------------------------------------------------------------------
# checkpoint


def _weight_shapes(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 arrays of a legacy llama2.c file, in file order (without optional parts)."""
    d, hid, n_l = h["dim"], h["hidden_dim"], h["n_layers"]
    kv_dim = h["n_kv_heads"] * (d // h["n_heads"])
    v = h["vocab_size"]
    return [
        ("token_embedding", (v, d)),
        ("rms_att", (n_l, d)),
        ("wq", (n_l, d, d)),
        ("wk", (n_l, kv_dim, d)),
        ("wv", (n_l, kv_dim, d)),
        ("wo", (n_l, d, d)),
        ("rms_ffn", (n_l, d)),
        ("w1", (n_l, hid, d)),
        ("w2", (n_l, d, hid)),
        ("w3", (n_l, hid, d)),
        ("rms_final", (d,)),
    ]


def _parse_header(raw: bytes, path: Path) -> dict:
    if len(raw) < _HEADER_BYTES:
        raise ValueError(
            f"{path}: expected a llama2.c checkpoint with a {_HEADER_BYTES}-byte header, "
            f"got a file of {len(raw)} bytes (truncated?)"
        )
    if struct.unpack("<I", raw[:4])[0] == _VERSIONED_MAGIC:
        raise ValueError(
            f"{path}: this is a versioned llama2.c export (magic 'ak42'); expected the legacy "
            "format (export with --version 0)"
        )
    vals = struct.unpack("<7i", raw[:_HEADER_BYTES])
    h = dict(zip(_HEADER_FIELDS, vals))
    shared = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    for k in _HEADER_FIELDS:
        if h[k] <= 0:
            raise ValueError(f"{path}: header field {k} must be positive, got {h[k]} (header {vals})")
    if h["dim"] % h["n_heads"]:
        raise ValueError(f"{path}: dim {h['dim']} is not divisible by n_heads {h['n_heads']}")
    if h["n_heads"] % h["n_kv_heads"]:
        raise ValueError(
            f"{path}: n_heads {h['n_heads']} is not divisible by n_kv_heads {h['n_kv_heads']}"
        )
    if (h["dim"] // h["n_heads"]) % 2:
        raise ValueError(f"{path}: head size {h['dim'] // h['n_heads']} must be even for RoPE")
    h["head_size"] = h["dim"] // h["n_heads"]
    h["shared_classifier"] = shared
    return h


def read_llama2c_checkpoint(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a legacy llama2.c ``model.bin``.

    Returns ``(header, weights)``. ``header`` has dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size (always positive), seq_len, head_size, shared_classifier (bool) and
    has_rope_tables (bool). ``weights`` holds float32 arrays in llama2.c's own layout
    (``[out, in]`` matrices, interleaved-RoPE row order):
    token_embedding [V, D], rms_att [L, D], wq [L, D, D], wk [L, KV, D], wv [L, KV, D],
    wo [L, D, D], rms_ffn [L, D], w1 [L, H, D], w2 [L, D, H], w3 [L, H, D], rms_final [D],
    freq_cis_real / freq_cis_imag [S, head_size/2] when the file has them, and wcls [V, D] when
    the classifier is not shared with the embedding.

    Raises ValueError when the file's size disagrees with its header (truncated or not a
    llama2.c file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"llama2c checkpoint: expected a file, got {path} (missing)")
    raw = path.read_bytes()
    h = _parse_header(raw, path)
    shapes = _weight_shapes(h)
    n_base = sum(int(np.prod(s)) for _, s in shapes)
    n_rope = 2 * h["seq_len"] * (h["head_size"] // 2)
    n_cls = 0 if h["shared_classifier"] else h["vocab_size"] * h["dim"]
    have = len(raw) - _HEADER_BYTES
    with_rope = 4 * (n_base + n_rope + n_cls)
    without_rope = 4 * (n_base + n_cls)
    if have == with_rope:
        has_rope = True
    elif have == without_rope:
        has_rope = False
    else:
        hdr = {k: h[k] for k in _HEADER_FIELDS}
        raise ValueError(
            f"{path}: header {hdr} (classifier {'shared' if h['shared_classifier'] else 'separate'}) "
            f"needs {with_rope} bytes of weights (or {without_rope} without RoPE tables) after the "
            f"{_HEADER_BYTES}-byte header, got {have}"
            + (" (file truncated)" if have < without_rope else " (sizes disagree)")
        )
    h["has_rope_tables"] = has_rope
    if has_rope:
        half = h["head_size"] // 2
        shapes = shapes + [("freq_cis_real", (h["seq_len"], half)), ("freq_cis_imag", (h["seq_len"], half))]
    if not h["shared_classifier"]:
        shapes = shapes + [("wcls", (h["vocab_size"], h["dim"]))]
    flat = np.frombuffer(raw, dtype="<f4", offset=_HEADER_BYTES)
    out, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = flat[pos : pos + n].reshape(shape).astype(np.float32)
        pos += n
    assert pos == flat.size
    bad = [k for k, a in out.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"{path}: expected finite weights, got NaN/inf in {bad}")
    return h, out


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows of a q/k projection from interleaved-pair RoPE to rotate-half RoPE.

    w: [n_heads * head_dim, D]. Within each head, row order (0, 1, 2, 3, ...) becomes
    (0, 2, 4, ..., 1, 3, 5, ...): rows [n_heads, head_dim/2, 2, D] -> [n_heads, 2, head_dim/2, D].
    """
    rows, d = w.shape
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"permute_rope_rows: rows {rows} must split into {n_heads} heads of even size")
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def hf_state_dict(header: dict, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map llama2.c arrays to HF ``LlamaForCausalLM`` safetensors names (q/k rows permuted)."""
    sd = {"model.embed_tokens.weight": weights["token_embedding"]}
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = permute_rope_rows(weights["wq"][i], header["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = permute_rope_rows(weights["wk"][i], header["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = weights["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = weights["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = weights["w1"][i]
        sd[p + "mlp.up_proj.weight"] = weights["w3"][i]
        sd[p + "mlp.down_proj.weight"] = weights["w2"][i]
        sd[p + "input_layernorm.weight"] = weights["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = weights["rms_ffn"][i]
    sd["model.norm.weight"] = weights["rms_final"]
    if not header["shared_classifier"]:
        sd["lm_head.weight"] = weights["wcls"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def hf_config(header: dict) -> dict:
    """``config.json`` contents for the checkpoint (a LlamaConfig, float32)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": header["dim"],
        "intermediate_size": header["hidden_dim"],
        "num_hidden_layers": header["n_layers"],
        "num_attention_heads": header["n_heads"],
        "num_key_value_heads": header["n_kv_heads"],
        "head_dim": header["head_size"],
        "vocab_size": header["vocab_size"],
        "max_position_embeddings": header["seq_len"],
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": bool(header["shared_classifier"]),
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------
# tokenizer


def read_llama2c_vocab(path, vocab_size: int) -> tuple[list[bytes], np.ndarray, int]:
    """Read a llama2.c ``tokenizer.bin``: ``(pieces as raw bytes, scores [V] float32, max_token_length)``.

    Layout: int32 max_token_length, then per token float32 score, int32 length, bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"llama2c tokenizer: expected a file, got {path} (missing)")
    if int(vocab_size) <= 0:
        raise ValueError(f"llama2c tokenizer: vocab_size must be positive, got {vocab_size}")
    raw = path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: expected a llama2.c tokenizer.bin, got {len(raw)} bytes")
    (max_len,) = struct.unpack_from("<i", raw, 0)
    pos, pieces, scores = 4, [], np.zeros(vocab_size, np.float32)
    for i in range(vocab_size):
        if pos + 8 > len(raw):
            raise ValueError(
                f"{path}: expected {vocab_size} tokens, the file ends inside token {i} (truncated?)"
            )
        score, n = struct.unpack_from("<fi", raw, pos)
        pos += 8
        if n < 0 or pos + n > len(raw):
            raise ValueError(f"{path}: token {i} claims {n} bytes, only {len(raw) - pos} remain (truncated?)")
        pieces.append(raw[pos : pos + n])
        scores[i] = score
        pos += n
    if pos != len(raw):
        raise ValueError(
            f"{path}: expected exactly {vocab_size} tokens ({pos} bytes), got {len(raw)} bytes "
            "(vocab_size disagrees with the tokenizer file)"
        )
    return pieces, scores, max_len


def _piece_to_hf(i: int, piece: bytes) -> str:
    """llama2.c's export writes '▁' as ' ' and <s>, </s> as '\\n<s>\\n', '\\n</s>\\n'; undo both."""
    if i == BOS_ID:
        return "<s>"
    if i == EOS_ID:
        return "</s>"
    try:
        s = piece.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"llama2c tokenizer: token {i} is not valid UTF-8: {piece!r}") from e
    return s.replace(" ", _SPIECE_SPACE)


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges from a scored SentencePiece vocabulary.

    Every split (left, right) of a piece with both halves in the vocabulary is a merge; merges are
    ranked by the merged piece's score (highest first), ties by the halves' ids.
    """
    merges = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[piece], pid, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def read_llama2c_tokenizer(path, vocab_size: int):
    """Build a ``tokenizers.Tokenizer`` equivalent to llama2.c's encoder from ``tokenizer.bin``.

    SentencePiece-style BPE with byte fallback ("<0x0A>" pieces), merges ranked by score,
    Metaspace pre-tokenizer that prepends "▁" to the first word (Llama's ``add_dummy_prefix``),
    a decoder that maps "▁" back to spaces and drops the dummy prefix, and a post-processor that
    adds BOS (id 1). Ids equal llama2.c's ids.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    pieces, scores, _ = read_llama2c_vocab(path, vocab_size)
    strs = [_piece_to_hf(i, p) for i, p in enumerate(pieces)]
    if strs[UNK_ID] != "<unk>":
        raise ValueError(f"{path}: expected token 0 to be '<unk>', got {strs[UNK_ID]!r}")
    vocab: dict[str, int] = {}
    for i, s in enumerate(strs):
        if s in vocab:
            raise ValueError(f"{path}: duplicate piece {s!r} at ids {vocab[s]} and {i}")
        vocab[s] = i
    score_of = {s: float(scores[i]) for i, s in enumerate(strs)}
    specials = {"<unk>", "<s>", "</s>"}
    mergeable = {s: i for s, i in vocab.items() if s not in specials}
    merges = sentencepiece_merges(mergeable, score_of)

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE_SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def _write_tokenizer(tok, dst: Path) -> None:
    tok.save(str(dst / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    cfg = {
        "tokenizer_class": "LlamaTokenizerFast",
        **specials,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "padding_side": "left",
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# conversion


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def convert_llama2c(src_bin, tok_bin, dst_dir, overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama directory for a llama2.c checkpoint; returns ``dst_dir``.

    Files: config.json, generation_config.json, model.safetensors (float32, HF key names, q/k
    rows permuted to rotate-half RoPE, no lm_head.weight when tied), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json. Everything is built in a temporary folder
    beside ``dst_dir`` and renamed into place at the end, so ``dst_dir`` is never half-written.
    Raises ValueError when ``dst_dir`` exists and is not empty (unless ``overwrite``), or when a
    source file is malformed.
    """
    from safetensors.numpy import save_file

    dst = Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"convert_llama2c: destination {dst} exists and is not a directory")
    if _is_nonempty_dir(dst) and not overwrite:
        raise ValueError(
            f"convert_llama2c: destination {dst} exists and is not empty; pass overwrite=True "
            "(--overwrite) to replace it"
        )
    header, weights = read_llama2c_checkpoint(src_bin)
    tok = read_llama2c_tokenizer(tok_bin, header["vocab_size"])
    sd = hf_state_dict(header, weights)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    old = None
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(header), indent=2) + "\n")
        gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_tokenizer(tok, tmp)
        os.chmod(tmp, 0o755)
        if _is_nonempty_dir(dst):  # overwrite: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "d")
        elif dst.is_dir():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "d").exists() and not dst.exists():
            os.replace(old / "d", dst)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dst


def _find_inputs(src: Path, tokenizer: str | None) -> tuple[Path, Path]:
    """Resolve ``SRC`` (a .bin or a folder holding one) and the tokenizer file."""
    def is_tok(p: Path) -> bool:
        return p.name == "tokenizer.bin" or p.name.startswith("tok")

    if src.is_dir():
        bins = sorted(p for p in src.glob("*.bin") if not is_tok(p))
        if len(bins) != 1:
            raise ValueError(
                f"{src}: expected exactly one llama2.c model .bin (besides tok*.bin), got {[p.name for p in bins]}"
            )
        model, folder = bins[0], src
    elif src.is_file():
        model, folder = src, src.parent
    else:
        raise ValueError(f"llama2c source: expected a .bin file or a folder, got {src} (missing)")
    if tokenizer is not None:
        return model, Path(tokenizer)
    toks = sorted(p for p in folder.glob("*.bin") if is_tok(p))
    if len(toks) != 1:
        raise ValueError(
            f"{folder}: expected exactly one tokenizer file (tokenizer.bin or tok*.bin), got "
            f"{[p.name for p in toks]}; pass --tokenizer"
        )
    return model, toks[0]


def main_convert(argv=None) -> int:
    """CLI: ``llama2c SRC_DIR_OR_BIN DST [--tokenizer TOK] [--overwrite]``.

    A leading ``llama2c`` word in ``argv`` is optional (so both ``swiftjax convert llama2c ...``
    passing ``argv[2:]`` or ``argv[3:]`` work). Returns 0 on success.
    """
    argv = list(argv) if argv is not None else []
    if argv and argv[0] == "llama2c":
        argv = argv[1:]
    ap = argparse.ArgumentParser(
        prog="swiftjax convert llama2c",
        description="Convert a llama2.c checkpoint (model .bin + tokenizer.bin) to a Hugging Face Llama folder.",
    )
    ap.add_argument("src", help="llama2.c model .bin, or a folder holding it and its tokenizer")
    ap.add_argument("dst", help="output folder (must be absent or empty unless --overwrite)")
    ap.add_argument("--tokenizer", default=None, help="llama2.c tokenizer.bin (default: found beside SRC)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    args = ap.parse_args(argv)
    model, tok = _find_inputs(Path(args.src), args.tokenizer)
    out = convert_llama2c(model, tok, args.dst, overwrite=args.overwrite)
    print(f"wrote {out} (from {model} and {tok})")
    return 0
