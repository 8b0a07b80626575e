"""Tiny random Hugging Face models for parity tests (saved with save_pretrained)."""
from __future__ import annotations

import torch
import transformers

ARCHS = ("llama", "llama3", "mistral", "qwen2", "gpt2", "qwen3", "gemma2", "gemma3", "phi3")
# the 11-token test batches are longer than these windows; Gemma's blocks alternate sliding / full
WINDOWS = {"mistral": 5, "gemma2": 4, "gemma3": 4, "phi3": 6}


def tiny_hf_config(arch: str, vocab: int = 97):
    common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(**common, attention_bias=True, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if arch == "llama3":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=5, tie_word_embeddings=False)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "qwen3":  # head_dim 16 != 48 / 4
        return transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    if arch == "gemma2":  # small soft-caps so that they change the outputs
        return transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24,
                                         sliding_window=WINDOWS[arch], attn_logit_softcapping=1.5,
                                         final_logit_softcapping=2.0,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    if arch == "gemma3":  # local / global RoPE bases, linear scaling on the global one; transformers
        # ignores attn_logit_softcapping in Gemma 3 (so must we), final_logit_softcapping applies
        return transformers.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=20, sliding_window=WINDOWS[arch],
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=0.5, final_logit_softcapping=2.5,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 2000.0}})
    if arch == "phi3":  # partial rotary + longrope (short factors below 64 positions; attention
        # factor from max / original max = 2), window on every block
        return transformers.Phi3Config(
            **common, sliding_window=WINDOWS[arch], tie_word_embeddings=False,
            original_max_position_embeddings=64, partial_rotary_factor=0.5,
            rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
                             "short_factor": [1.0, 1.7, 2.9], "long_factor": [2.0, 5.0, 11.0]})
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=48, n_layer=3, n_head=4,
                                       n_positions=128, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=0)
    raise ValueError(arch)


def tiny_hf_model(arch: str, seed: int = 0, vocab: int = 97):
    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, vocab)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases: move away from 1 / 0 so they matter
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.eval()
    return model.float()


# ----------------------------------------------------------------------------- chat models on disk

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT_SPECIALS = {
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"),
}


def char_tokenizer(specials):
    """A character-level ``tokenizers`` pipeline: ``specials`` first, then every printable
    ASCII character and newline (so any such text round-trips)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<unk>", *specials, *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(list(specials))
    return tk, len(vocab)


def save_tiny_chat_model(arch: str, path, seed: int = 0, *, with_template: bool = True):
    """A tiny random HF model with a chat tokenizer saved at ``path``: ``qwen2`` (ChatML
    template, eos <|im_end|>) or ``llama3`` (Llama-3 headers, bos <|begin_of_text|>, eos <|eot_id|>).
    Returns (path, tokenizer)."""
    import json
    from pathlib import Path

    path = Path(path)
    specials = CHAT_SPECIALS[arch]
    tk, n = char_tokenizer(specials)
    model = tiny_hf_model("qwen2" if arch == "qwen2" else "llama3", seed=seed, vocab=128)
    model.config.max_position_embeddings = 512
    model.save_pretrained(path, safe_serialization=True)
    tk.save(str(path / "tokenizer.json"))
    ids = {t: tk.token_to_id(t) for t in specials}
    if arch == "qwen2":
        tcfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
        gcfg = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
        template = CHATML
    else:
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        gcfg = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|eot_id|>"], ids["<|end_of_text|>"]]}
        template = LLAMA3
    tcfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
                 "clean_up_tokenization_spaces": False})
    if with_template:
        tcfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (path / "generation_config.json").write_text(json.dumps(gcfg))
    return path, tk


GSM8K_TOY = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("A box holds 6 pens. How many pens are in 2 boxes?", "6 * 2 = 12\n#### 12"),
    ("Mia had 10 cookies and ate 3. How many are left?", "10 - 3 = 7\n#### 7"),
    ("Sam reads 5 pages a day. How many pages in 3 days?", "5 * 3 = 15\n#### 15"),
    ("There are 9 birds and 4 fly away. How many stay?", "9 - 4 = 5\n#### 5"),
    ("Ana saves 2 dollars a week for 6 weeks. How much?", "2 * 6 = 12\n#### 12"),
]


def write_gsm8k_toy(path, rows=GSM8K_TOY):
    """A GSM8K-format jsonl (question, answer ending in '#### n')."""
    import json

    with open(path, "w") as f:
        for q, a in rows:
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return path
