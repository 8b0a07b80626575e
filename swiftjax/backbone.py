"""A Backbone: any local Hugging Face causal-LM directory with everything a pipeline needs to
prompt it, stop it and score it.

* the model (:func:`swiftjax.load_model`: config.json + safetensors, no torch);
* its own tokenizer (``tokenizer.json`` through ``tokenizers``; special tokens from
  ``tokenizer_config.json``);
* its chat template (``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja``),
  or, for a base model without one, a template the config names (:data:`TEMPLATES`, or any
  Jinja string);
* its end-of-turn / EOS ids (``generation_config.json``'s ``eos_token_id`` plus the tokenizer's
  eos token) and its pad id;
* a response mask that marks exactly the assistant turn: the tokens after the rendered
  generation prompt, up to and including the first end-of-turn id.

The embedded world's model is one Backbone among others (its directory carries a chat
template and ``eos_token_id: [<|end|>, <eos>]``).

Every output a Backbone feeds (candidates, feature stores, heads) is keyed by
:attr:`Backbone.digest`: the sha256 of its weights, tokenizer files and the template in use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from swiftjax.models.load import load_model

# ``model: world`` names the model the project trains on its embedded world and ships.
WORLD_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "world_model"

__all__ = ["WORLD_MODEL_DIR", "BackboneConfig", "Backbone", "load_backbone", "TEMPLATES", "render_template"]

# Templates for base models without a chat template (``template: plain``). The response
# ends with the tokenizer's eos token.
TEMPLATES = {
    "plain": ("{{ bos_token }}{% for m in messages %}"
              "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
              "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] }}{{ eos_token }}"
              "{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}Answer:{% endif %}"),
}


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Which model directory and how to prompt it. ``template``: null = the directory's own chat
    template (an error when it has none), a name from :data:`TEMPLATES`, or a Jinja string.
    ``system``: an optional system message. ``dtype``: parameter dtype."""

    path: str | None = None
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"


def _raise(msg):
    raise ValueError(f"chat template: {msg}")


def render_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool,
                    bos_token: str = "", eos_token: str = "") -> str:
    """Render a Jinja chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: cannot render ({e})") from None


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected {what} as a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what} as a JSON object, got {type(data).__name__}")
    return data


def _ids_of(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return list(v)
    raise ValueError(f"expected an int or a list of ints, got {v!r}")


class Backbone:
    """A model directory opened for prompting, sampling and scoring (see the module doc)."""

    def __init__(self, path, *, template: str | None = None, system: str | None = None, dtype: str = "float32",
                 model=None, config=None):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ValueError(f"model: expected a Hugging Face model directory, {self.path} is not a directory")
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{self.path}: expected a tokenizer (tokenizer.json) beside the weights; "
                             "convert or save one with the model")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{tok_file}: expected a tokenizers JSON file ({e})") from None
        tcfg_file = self.path / "tokenizer_config.json"
        self.tokenizer_config = _read_json(tcfg_file, "the tokenizer config") if tcfg_file.is_file() else {}
        gcfg_file = self.path / "generation_config.json"
        self.generation_config = _read_json(gcfg_file, "the generation config") if gcfg_file.is_file() else {}
        self.bos_token = _token_str(self.tokenizer_config.get("bos_token")) or ""
        self.eos_token = _token_str(self.tokenizer_config.get("eos_token")) or ""
        self.template_name, self.template = self._resolve_template(template)
        self.system = system
        self.dtype = dtype
        if model is None:
            if dtype not in ("float32", "bfloat16"):
                raise ValueError(f"model.dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
            model, config = load_model(self.path, dtype=getattr(jnp, dtype))
        self.model, self.config = model, config
        self.eos_ids = self._resolve_eos()
        self.pad_id = self._resolve_pad()
        v = int(self.config.vocab_size)
        for name, ids in (("eos", self.eos_ids), ("pad", (self.pad_id,))):
            if any(not 0 <= i < v for i in ids):
                raise ValueError(f"{self.path}: {name} token ids {ids} outside the model's vocabulary [0, {v})")

    # ------------------------------------------------------------------ setup

    def _resolve_template(self, template):
        if template is None:
            own = self.tokenizer_config.get("chat_template")
            jinja_file = self.path / "chat_template.jinja"
            if own is None and jinja_file.is_file():
                own = jinja_file.read_text(encoding="utf-8")
            if isinstance(own, list):  # named templates: take 'default'
                own = next((t.get("template") for t in own if isinstance(t, dict) and t.get("name") == "default"), None)
            if not isinstance(own, str) or not own.strip():
                raise ValueError(f"{self.path}: the tokenizer has no chat template; expected one in "
                                 f"tokenizer_config.json, or name one with model.template= "
                                 f"(one of {sorted(TEMPLATES)}, or a Jinja string)")
            return "own", own
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"model.template: expected null, one of {sorted(TEMPLATES)} or a Jinja string, "
                             f"got {template!r}")
        if template in TEMPLATES:
            return template, TEMPLATES[template]
        if "{" not in template:
            raise ValueError(f"model.template: expected one of {sorted(TEMPLATES)} or a Jinja string, got {template!r}")
        return "custom", template

    def _special_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token) if token else None

    def _resolve_eos(self) -> tuple[int, ...]:
        try:
            ids = _ids_of(self.generation_config.get("eos_token_id"))
        except ValueError as e:
            raise ValueError(f"{self.path / 'generation_config.json'}: eos_token_id: {e}") from None
        tok_eos = self._special_id(self.eos_token)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        if not ids:
            ids = _ids_of(getattr(self.config, "eos_token_id", None) or None)
        if not ids:
            raise ValueError(f"{self.path}: expected an end-of-turn id (generation_config.json eos_token_id "
                             "or the tokenizer's eos_token); found none")
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _resolve_pad(self) -> int:
        pad = self._special_id(_token_str(self.tokenizer_config.get("pad_token")) or "")
        if pad is None:
            pad = self.generation_config.get("pad_token_id")
        if not isinstance(pad, int) or isinstance(pad, bool):
            pad = self.eos_ids[0]  # a pad id is only ever read under a zero mask
        return int(pad)

    @cached_property
    def digest(self) -> str:
        """sha256 over the weights, the tokenizer files and the template in use."""
        h = hashlib.sha256()
        files = sorted(self.path.glob("*.safetensors")) + [self.path / n for n in
                                                           ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                            "generation_config.json")]
        for f in files:
            if f.is_file():
                h.update(f.name.encode())
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
        h.update(json.dumps([self.template, self.system, self.dtype]).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        """What outputs record about the model they came from."""
        return {"path": str(self.path), "digest": self.digest, "template": self.template_name,
                "eos_ids": list(self.eos_ids), "pad_id": self.pad_id, "dtype": self.dtype,
                "model_type": self.config.model_type}

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as written (special-token strings become their ids; nothing added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def prompt_text(self, question: str) -> str:
        return render_template(self.template, self._messages(question), add_generation_prompt=True,
                               bos_token=self.bos_token, eos_token=self.eos_token)

    def prompt_ids(self, question: str) -> list[int]:
        """The rendered generation prompt: what sampling continues."""
        if not isinstance(question, str):
            raise ValueError(f"question: expected a str, got {type(question).__name__}")
        return self.encode(self.prompt_text(question))

    def response_ids(self, question: str, answer: str) -> list[int]:
        """The assistant turn of ``answer`` as the template renders it, cut after its first
        end-of-turn id (one is appended when the template writes none)."""
        if not isinstance(answer, str):
            raise ValueError(f"answer: expected a str, got {type(answer).__name__}")
        prompt = self.prompt_text(question)
        full = render_template(self.template, self._messages(question, answer), add_generation_prompt=False,
                               bos_token=self.bos_token, eos_token=self.eos_token)
        if not full.startswith(prompt):
            raise ValueError("chat template: the conversation with the answer does not start with the "
                             "generation prompt; cannot tell where the assistant turn begins")
        ids = self.encode(full[len(prompt):])
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[: j + 1]
        return ids + [self.eos_ids[0]]

    def decode_response(self, ids) -> str:
        """Text of generated ids: up to (not including) the first end-of-turn id, pad ids
        dropped, any other special token kept as its string (graders see what was generated)."""
        out = []
        for t in np.asarray(ids).reshape(-1).tolist():
            if t in self.eos_ids:
                break
            if t != self.pad_id:
                out.append(int(t))
        return self.tokenizer.decode(out, skip_special_tokens=False)

    def trim_response(self, ids) -> list[int]:
        """Generated ids up to and including the first end-of-turn id (all of them if none)."""
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[: j + 1]
        return ids

    # ------------------------------------------------------------------ batches

    def _check_len(self, n: int, max_len: int, what: str):
        limit = int(self.config.max_position_embeddings)
        if n > max_len:
            raise ValueError(f"{what}: expected at most {max_len} tokens, got {n}")
        if n > limit:
            raise ValueError(f"{what}: {n} tokens exceed the model's context of {limit} positions")

    def encode_prompts(self, questions: Sequence[str], max_len: int):
        """Left-padded generation prompts: (ids [B, max_len], mask [B, max_len]) int32."""
        ids = np.full((len(questions), max_len), self.pad_id, np.int32)
        mask = np.zeros_like(ids)
        cache: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            row = cache.get(q)
            if row is None:
                row = cache[q] = self.prompt_ids(q)
            self._check_len(len(row), max_len, f"prompt {i} ({q[:40]!r}...)")
            ids[i, max_len - len(row):] = row
            mask[i, max_len - len(row):] = 1
        return ids, mask

    def encode_pairs(self, questions: Sequence[str], responses: Sequence[Sequence[int]], max_len: int):
        """Teacher-forced prompt + response ids, right-padded: (ids, attention_mask,
        response_mask), each [B, max_len] int32; the response mask marks the response ids."""
        if len(questions) != len(responses):
            raise ValueError(f"responses: expected one per question ({len(questions)}), got {len(responses)}")
        v = int(self.config.vocab_size)
        ids = np.full((len(questions), max_len), self.pad_id, np.int32)
        attn = np.zeros_like(ids)
        resp = np.zeros_like(ids)
        cache: dict[str, list[int]] = {}
        for i, (q, r) in enumerate(zip(questions, responses)):
            p = cache.get(q)
            if p is None:
                p = cache[q] = self.prompt_ids(q)
            r = [int(t) for t in r]
            bad = [t for t in r if not 0 <= t < v]
            if bad:
                raise ValueError(f"response {i}: token ids {bad[:5]} outside the vocabulary [0, {v})")
            seq = p + r
            self._check_len(len(seq), max_len, f"prompt + response {i}")
            ids[i, : len(seq)] = seq
            attn[i, : len(seq)] = 1
            resp[i, len(p): len(seq)] = 1
        return ids, attn, resp

    def encode_examples(self, questions: Sequence[str], answers: Sequence[str], max_len: int):
        """Training examples (a demonstration per question) as :meth:`encode_pairs` rows."""
        return self.encode_pairs(questions, [self.response_ids(q, a) for q, a in zip(questions, answers)], max_len)


def load_backbone(cfg: BackboneConfig | str | Path) -> Backbone:
    """A :class:`Backbone` from a config (or a bare directory path). Inside a
    :func:`swiftjax.parallel.use_mesh` block its weights are placed on that mesh (tensor
    parallel over heads / FFN / vocabulary, FSDP over 'data')."""
    if isinstance(cfg, (str, Path)):
        cfg = BackboneConfig(path=str(cfg))
    if not cfg.path:
        raise ValueError("model: expected a Hugging Face model directory")
    path = WORLD_MODEL_DIR if cfg.path == "world" else cfg.path
    backbone = Backbone(path, template=cfg.template, system=cfg.system, dtype=cfg.dtype)
    from swiftjax import parallel

    parallel.shard_model(backbone.model, parallel.current_mesh())
    return backbone
