"""The embedded world's tokenizer, chat template and batch encoders.

A word-level Hugging Face ``tokenizers`` pipeline built deterministically from
:func:`swiftjax.world.problems.vocabulary`:

* every world word is one token, with its leading space folded in (``' apples'``); words
  that start with a capital also exist without the space (sentence and line starts);
* every digit is its own token (``' 243'`` -> ``' 2' '4' '3'``), so is each operator
  (``' *'``, ``' ='``), and the solution markers ``'Step 1:'`` ... ``'Step 8:'`` and
  ``'Answer:'`` are one token each;
* any other printable ASCII character, space, tab, newline or carriage return is a
  single-character token, so every text made of those round-trips exactly; any other
  character (non-ASCII, control characters) becomes ``<unk>``.

Special tokens (fixed ids): ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3,
``<|user|>``=4, ``<|assistant|>``=5, ``<|end|>``=6.  Vocabulary size: 7 + 98 characters
+ 10 spaced digits + 5 spaced operators + 9 phrases + world words with/without space (324
for the default world).

Chat format (no text between the markers)::

    <bos><|user|>{question}<|assistant|>{solution}<|end|>

The response span (what SWIFT scores and the response mask marks) is every token of the
assistant turn, ``{solution}`` plus ``<|end|>``; ``<|assistant|>`` belongs to the prompt.
The same template is stored as a Jinja ``chat_template`` in ``tokenizer_config.json`` so that
``transformers.AutoTokenizer.from_pretrained(dir).apply_chat_template`` reproduces it.

``tok`` arguments accept either a ``tokenizers.Tokenizer`` (what :func:`build_tokenizer`
and :func:`load_tokenizer` return) or a transformers fast tokenizer loaded from a saved
directory; both give the same ids.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from swiftjax._checks import check_int, check_rank
from swiftjax.world import problems as _world

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "USER", "ASSISTANT", "END", "SPECIAL_TOKENS",
    "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "USER_ID", "ASSISTANT_ID", "END_ID",
    "CHAT_TEMPLATE",
    "build_tokenizer", "save_tokenizer", "load_tokenizer", "load_hf_tokenizer",
    "encode", "decode",
    "format_prompt", "format_example",
    "encode_example", "encode_examples", "encode_prompts",
    "decode_response", "decode_responses",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT, END)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, USER_ID, ASSISTANT_ID, END_ID = range(7)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('only user and assistant roles are supported') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_OPERATORS = ("*", "+", "-", "/", "=")
_MODEL_MAX_LENGTH = 512


# ----------------------------------------------------------------------------- build


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as the ByteLevel pre-tokenizer
    and decoder use it): printable Latin-1 bytes map to themselves, the rest to U+0100+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _vocab(words: Sequence[str], phrases: Sequence[str]) -> dict[str, int]:
    """Token string (byte-level form) -> id, in a fixed order."""
    bc = _byte_chars()
    space = bc[ord(" ")]
    toks: list[str] = list(SPECIAL_TOKENS)
    chars = [" ", "\t", "\n", "\r"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
    toks += [bc[ord(c)] for c in chars]
    toks += [space + d for d in "0123456789"]
    toks += [space + o for o in _OPERATORS]
    toks += ["".join(bc[b] for b in p.encode("ascii")) for p in phrases]
    toks += [space + w for w in words]
    toks += [w for w in words if w[:1].isupper() and len(w) > 1]  # 'A' is already a char
    if len(set(toks)) != len(toks):
        raise ValueError("tokenizer vocabulary: expected distinct tokens, got duplicates")
    return {t: i for i, t in enumerate(toks)}


def _split_pattern(words: Sequence[str], phrases: Sequence[str]) -> str:
    def alt(items):
        return "|".join(re.escape(w) for w in sorted(items, key=lambda w: (-len(w), w)))

    caps = [w for w in words if w[:1].isupper() and len(w) > 1]
    ops = "".join(re.escape(o) for o in _OPERATORS)
    return (
        f"(?:{alt(phrases)})"
        f"| (?:{alt(words)})(?![A-Za-z])"
        f"|(?:{alt(caps)})(?![A-Za-z])"
        f"| ?[0-9]| ?[{ops}]|[\\s\\S]"
    )


def build_tokenizer(words: Iterable[str] | None = None, phrases: Iterable[str] | None = None):
    """A ``tokenizers.Tokenizer`` for the world (deterministic: same words -> same bytes).

    words: whole-word tokens (ASCII letters only); default :func:`world.vocabulary`.
    phrases: multi-character tokens kept whole (no leading space); default
        :data:`world.PHRASES` ('Step 1:' ... 'Step 8:', 'Answer:')."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    words = tuple(sorted(set(_world.vocabulary() if words is None else words)))
    phrases = tuple(_world.PHRASES if phrases is None else phrases)
    bad = [w for w in words if not re.fullmatch(r"[A-Za-z]+", w)]
    if bad:
        raise ValueError(f"words: expected ASCII-letter words, got {bad[:5]!r}")
    bad = [p for p in phrases if not p or not p.isascii() or p[0] == " " or len(p) < 2]
    if bad:
        raise ValueError(f"phrases: expected ASCII strings of >= 2 chars not starting with a space, got {bad[:5]!r}")
    tok = Tokenizer(models.WordLevel(_vocab(words, phrases), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_split_pattern(words, phrases)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    return tok


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [USER, ASSISTANT, END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": _MODEL_MAX_LENGTH,
        "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
    }


def save_tokenizer(tok, directory) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
    ``special_tokens_map.json`` into ``directory`` (created). Byte-identical for the same
    tokenizer. Returns the directory."""
    from tokenizers import Tokenizer

    if not isinstance(tok, Tokenizer):
        raise ValueError(f"tok: expected a tokenizers.Tokenizer, got {type(tok).__name__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
               "additional_special_tokens": [USER, ASSISTANT, END]}
    (d / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return d


def load_tokenizer(directory):
    """The ``tokenizers.Tokenizer`` saved in ``directory`` (checks the special-token ids)."""
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"directory: expected a folder with tokenizer.json, got {directory}")
    tok = Tokenizer.from_file(str(path))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(
            f"{path}: expected special tokens {SPECIAL_TOKENS} at ids 0..6, got ids {ids}")
    return tok


def load_hf_tokenizer(directory):
    """``transformers.AutoTokenizer.from_pretrained(directory)`` for a saved world tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


# ----------------------------------------------------------------------------- text <-> ids


def _is_raw(tok) -> bool:
    from tokenizers import Tokenizer

    return isinstance(tok, Tokenizer)


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text`` (special-token strings in it become their ids; nothing added)."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    if _is_raw(tok):
        return tok.encode(text, add_special_tokens=False).ids
    if hasattr(tok, "encode"):
        return list(tok.encode(text, add_special_tokens=False))
    raise ValueError(f"tok: expected a tokenizers.Tokenizer or a transformers tokenizer, got {type(tok).__name__}")


def decode(tok, ids) -> str:
    """Text of ``ids`` with special tokens kept as their strings."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if _is_raw(tok):
        return tok.decode(ids, skip_special_tokens=False)
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def format_prompt(question: str) -> str:
    """'<bos><|user|>{question}<|assistant|>': what generation continues."""
    if not isinstance(question, str):
        raise ValueError(f"question: expected a str, got {type(question).__name__}")
    return f"{BOS}{USER}{question}{ASSISTANT}"


def format_example(question: str, solution: str) -> str:
    """'<bos><|user|>{question}<|assistant|>{solution}<|end|>': a full training example."""
    if not isinstance(solution, str):
        raise ValueError(f"solution: expected a str, got {type(solution).__name__}")
    return f"{format_prompt(question)}{solution}{END}"


def _example_row(tok, question: str, solution: str, max_len: int):
    """(ids [max_len], response_mask [max_len], length) of one right-padded example."""
    prompt = encode(tok, format_prompt(question))
    ids = prompt + encode(tok, solution) + [END_ID]
    if len(ids) > max_len:
        raise ValueError(f"example: expected at most max_len={max_len} tokens, got {len(ids)}")
    out = np.full((max_len,), PAD_ID, np.int32)
    mask = np.zeros((max_len,), np.int32)
    out[: len(ids)] = ids
    mask[len(prompt): len(ids)] = 1
    return out, mask, len(ids)


def encode_example(tok, question: str, solution: str, max_len: int):
    """One training example, right-padded with <pad> to ``max_len``.

    Returns (ids [max_len] int32, response_mask [max_len] int32): response_mask is 1 on every
    token of the assistant turn (the solution's tokens and the closing <|end|>), 0 on the
    prompt (<bos> <|user|> question <|assistant|>) and on padding. The ids equal
    ``encode(tok, format_example(question, solution))`` followed by padding. Raises
    ValueError if the example needs more than ``max_len`` tokens."""
    _check_len(max_len)
    ids, mask, _ = _example_row(tok, question, solution, max_len)
    return ids, mask


def encode_examples(tok, questions: Sequence[str], solutions: Sequence[str], max_len: int):
    """A right-padded batch of training examples.

    Returns (ids [B, max_len] int32, attention_mask [B, max_len] int32 (1 on real tokens),
    response_mask [B, max_len] int32), rows as in :func:`encode_example`."""
    _check_len(max_len)
    if isinstance(questions, str) or isinstance(solutions, str):
        raise ValueError("questions, solutions: expected sequences of str, got a single str")
    if len(questions) != len(solutions):
        raise ValueError(
            f"solutions: expected one per question ({len(questions)}), got {len(solutions)}")
    ids = np.full((len(questions), max_len), PAD_ID, np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    for i, (q, s) in enumerate(zip(questions, solutions)):
        ids[i], resp[i], n = _example_row(tok, q, s, max_len)
        attn[i, :n] = 1
    return ids, attn, resp


def encode_prompts(tok, questions: Sequence[str], max_len: int, left_pad: bool = True):
    """Chat-formatted prompts (ending in <|assistant|>) padded with <pad> to ``max_len``.

    Returns (ids [B, max_len] int32, mask [B, max_len] int32; 1 on real tokens). Left padding
    (default) puts every prompt's last token in the last column, for batched generation.
    Raises ValueError if a prompt needs more than ``max_len`` tokens."""
    _check_len(max_len)
    if isinstance(questions, str):
        raise ValueError("questions: expected a sequence of str, got a single str")
    ids = np.full((len(questions), max_len), PAD_ID, np.int32)
    mask = np.zeros((len(questions), max_len), np.int32)
    for i, q in enumerate(questions):
        row = encode(tok, format_prompt(q))
        if len(row) > max_len:
            raise ValueError(
                f"questions[{i}]: expected a prompt of at most max_len={max_len} tokens, got {len(row)}")
        sl = slice(max_len - len(row), max_len) if left_pad else slice(0, len(row))
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask


def decode_response(tok, ids) -> str:
    """Text of generated response ids [T] (the tokens after the prompt): stops before the
    first <|end|> or <eos>, drops <pad>; other special tokens stay as their strings."""
    arr = np.asarray(ids)
    check_rank(arr, "ids", 1, "[T]")
    if arr.size:
        check_int(arr, "ids")
    out = []
    for i in arr.tolist():
        if i in (END_ID, EOS_ID):
            break
        if i != PAD_ID:
            out.append(int(i))
    return decode(tok, out)


def decode_responses(tok, ids) -> list[str]:
    """:func:`decode_response` of each row of ids [B, T]."""
    arr = np.asarray(ids)
    check_rank(arr, "ids", 2, "[B, T]")
    return [decode_response(tok, row) for row in arr]


def _check_len(max_len) -> None:
    if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
