"""Tiny random Hugging Face models for parity tests (saved with save_pretrained)."""
from __future__ import annotations

import torch
import transformers

ARCHS = ("llama", "llama3", "mistral", "qwen2", "gpt2")


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
