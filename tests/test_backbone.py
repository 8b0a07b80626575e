"""Backbone: any HF directory with its own tokenizer, chat template, end-of-turn ids and response mask."""
import json
import shutil

import numpy as np
import pytest
from hf_tiny import save_tiny_chat_model

from swiftjax.backbone import WORLD_MODEL_DIR, Backbone, BackboneConfig, load_backbone
from swiftjax.world import tokenizer as wtok


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def chat_dir(request, tmp_path_factory):
    path, tk = save_tiny_chat_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, tk


def _hf_render(path, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def test_prompt_is_the_directory_chat_template_as_transformers_renders_it(chat_dir):
    arch, path, tk = chat_dir
    bb = Backbone(path)
    q = "Tom has 3 apples.\nHow many?"
    text = _hf_render(path, [{"role": "user", "content": q}], True)
    assert bb.prompt_text(q) == text
    assert bb.prompt_ids(q) == tk.encode(text, add_special_tokens=False).ids
    if arch == "llama3":
        assert bb.prompt_ids(q)[0] == tk.token_to_id("<|begin_of_text|>")


def test_end_of_turn_and_pad_ids(chat_dir):
    arch, path, tk = chat_dir
    bb = Backbone(path)
    if arch == "qwen2":
        assert bb.eos_ids == (tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>"))
        assert bb.pad_id == tk.token_to_id("<|endoftext|>")
    else:
        assert bb.eos_ids == (tk.token_to_id("<|eot_id|>"), tk.token_to_id("<|end_of_text|>"))
        assert bb.pad_id == bb.eos_ids[0]  # no pad token: eos, only ever read under a zero mask


def test_response_mask_marks_exactly_the_assistant_turn(chat_dir):
    arch, path, tk = chat_dir
    bb = Backbone(path)
    q, a = "2 + 3?", "2 + 3 = 5\n#### 5"
    full = _hf_render(path, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], False)
    end = "<|im_end|>" if arch == "qwen2" else "<|eot_id|>"
    # the assistant turn as transformers renders it, up to and including its end-of-turn token
    turn = full[len(bb.prompt_text(q)):]
    turn = turn[: turn.index(end) + len(end)]
    assert turn == a + end
    ids, attn, resp = bb.encode_examples([q], [a], 96)
    p = len(bb.prompt_ids(q))
    r = tk.encode(turn, add_special_tokens=False).ids
    assert ids[0, p: p + len(r)].tolist() == r
    assert resp[0].tolist() == [0] * p + [1] * len(r) + [0] * (96 - p - len(r))
    assert attn[0].sum() == p + len(r)
    assert bb.decode_response(ids[0, p:]) == a  # stops at the end-of-turn id


def test_world_backbone_is_the_world_format():
    bb = load_backbone(BackboneConfig(path="world"))
    tok = wtok.load_tokenizer(WORLD_MODEL_DIR)
    q = "Mia buys 3 pens at 4 dollars each. How much does she pay?"
    assert bb.prompt_ids(q) == wtok.encode(tok, wtok.format_prompt(q))
    assert set(bb.eos_ids) == {wtok.END_ID, wtok.EOS_ID} and bb.pad_id == wtok.PAD_ID
    ids, attn, resp = bb.encode_examples([q], ["Step 1: 3 * 4 = 12\nAnswer: 12"], 64)
    ref = wtok.encode_examples(tok, [q], ["Step 1: 3 * 4 = 12\nAnswer: 12"], 64)
    np.testing.assert_array_equal(ids[0, : attn[0].sum()], ref[0][0, : ref[1][0].sum()])
    np.testing.assert_array_equal(resp, ref[2])


def test_digest_covers_weights_tokenizer_and_template(chat_dir, tmp_path):
    arch, path, _ = chat_dir
    a = Backbone(path).digest
    assert Backbone(path, template="plain").digest != a
    other = tmp_path / "m"
    shutil.copytree(path, other)
    assert Backbone(other).digest == a  # content, not location
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"] + " "
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Backbone(other).digest != a


def test_bad_directories_are_clear_errors(tmp_path):
    path, _ = save_tiny_chat_model("qwen2", tmp_path / "m", with_template=False)
    with pytest.raises(ValueError, match="no chat template.*template="):
        Backbone(path)
    bb = Backbone(path, template="plain")  # a base model with a named plain template
    assert bb.prompt_text("hi").startswith("Question: hi")
    with pytest.raises(ValueError, match="model.template: expected"):
        Backbone(path, template="nonsense")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="expected a tokenizer"):
        Backbone(path, template="plain")
    with pytest.raises(ValueError, match="not a directory"):
        Backbone(tmp_path / "nope")


def test_prompt_longer_than_context_or_width_is_refused(chat_dir):
    _, path, _ = chat_dir
    bb = Backbone(path)
    with pytest.raises(ValueError, match="expected at most 8 tokens"):
        bb.encode_prompts(["a long question"], 8)
    with pytest.raises(ValueError, match="exceed the model's context of 512"):
        bb.encode_prompts(["x" * 600], 700)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\)"):
        bb.encode_pairs(["q"], [[5, 128]], 64)
