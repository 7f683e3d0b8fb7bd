"""Qwen3 text encoder: prompt formatting, hidden-state parity with transformers, loading, errors."""

import json
import os
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import rel_err
from mlx.utils import tree_flatten
from mlx_lm.models.qwen3 import ModelArgs
from tiny_text import (
    CONFIG_B,
    CONFIG_Q4,
    OUT_LAYERS_B,
    reference_qwen3,
    write_qwen3_dense,
    write_qwen3_mlx4bit,
    write_tokenizer,
)

from mlx_bonsai.errors import ConfigError, PromptError, WeightsError
from mlx_bonsai.text_encoder import (
    Qwen3Encoder,
    TextEncoder,
    format_prompt,
    load_qwen3_encoder,
    load_tokenizer,
    tokenize_prompts,
)

# Float32 on both sides: what is left is summation order.
PARITY_TOL = 1e-5

# Qwen3-4B's text_encoder/config.json (architecture.md §2.3).
QWEN3_4B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)

PROMPTS = [
    "a red fox",
    "\u200b",  # zero-width space: looks empty but is not whitespace, so it is a valid prompt
    "!",
    "富士山の夕焼け、桜と🦊🌸",
    "a cat " * 112 + "!!!",  # 675 bytes + 25 chat-template tokens = 700 tokens
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return write_qwen3_dense(tmp_path_factory.mktemp("dense"), CONFIG_B, seed=1)


def expected_text(prompt):
    return (
        "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def reference_hidden(model_dir, ids, mask):
    model = reference_qwen3(model_dir)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.array(ids)).long(),
            attention_mask=torch.from_numpy(np.array(mask)).long(),
            output_hidden_states=True,
            use_cache=False,
        )
    return [h.numpy() for h in out.hidden_states]


def check_parity(encoder, model_dir, prompts, out_layers):
    ids, mask = encoder.tokenize(prompts)
    assert 0 < int(mask.sum(axis=1).min()) < ids.shape[1]  # some rows are padded
    ours = np.array(encoder.encode(ids, mask))
    hidden = reference_hidden(model_dir, ids, mask)
    width = hidden[0].shape[-1]
    assert ours.shape == (len(prompts), ids.shape[1], len(out_layers) * width)
    errors = [rel_err(ours, np.concatenate([hidden[k] for k in out_layers], axis=-1))]
    for i, k in enumerate(out_layers):
        errors.append(rel_err(ours[..., i * width : (i + 1) * width], hidden[k]))
    assert max(errors) <= PARITY_TOL, errors


# ---- prompt formatting and tokenization ----


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_template_renders_the_klein_prompt(tokenizer, prompt):
    assert format_prompt(tokenizer, prompt) == expected_text(prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_match_transformers(tokenizer, prompt):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    # The diffusers pipeline's path: render, then tokenize with padding and truncation.
    ref = tokenizer(text, padding="max_length", truncation=True, max_length=512)
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=True,
        add_generation_prompt=True,
        enable_thinking=False,
    )["input_ids"]
    full_length = len(templated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = tokenize_prompts(tokenizer, prompt)
    assert ids.shape == mask.shape == (1, 512) and ids.dtype == mask.dtype == mx.int32
    assert np.array(ids)[0].tolist() == ref["input_ids"]
    assert np.array(mask)[0].tolist() == ref["attention_mask"]
    n = min(full_length, 512)
    assert np.array(ids)[0, :n].tolist() == templated[:n]
    assert int(mask.sum()) == n
    assert np.array(ids)[0, -1] == tokenizer.pad_token_id or full_length >= 512
    if prompt.startswith("a cat"):
        assert full_length == 700
        assert len(caught) == 1 and "188 tokens dropped" in str(caught[0].message)
    else:
        assert not caught


def test_tokenizer_dir_in_prismml_layout(tok_dir, tokenizer, tmp_path):
    """PrismML's tokenizer/ may hold only tokenizer.json and chat_template.jinja; the template may
    also live in tokenizer_config.json instead."""
    only = tmp_path / "only"
    only.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        (only / name).write_bytes((tok_dir / name).read_bytes())
    in_config = tmp_path / "in_config"
    in_config.mkdir()
    (in_config / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (tok_dir / "chat_template.jinja").read_text()
    (in_config / "tokenizer_config.json").write_text(json.dumps(config))
    expected = np.array(tokenize_prompts(tokenizer, PROMPTS[3], 64)[0])
    for d in (only, in_config):
        other = load_tokenizer(d)
        assert other.pad_token == "<|endoftext|>"
        assert np.array_equal(np.array(tokenize_prompts(other, PROMPTS[3], 64)[0]), expected)


# ---- hidden-state parity with transformers (float32) ----


def test_dense_parity_config_b(dense_dir, tok_dir):
    encoder = TextEncoder.from_pretrained(
        dense_dir, tok_dir, dtype=mx.float32, out_layers=OUT_LAYERS_B, max_length=64
    )
    assert len(encoder.model.model.layers) == 3  # layer 3 of 4 is never built
    check_parity(encoder, dense_dir, PROMPTS[:4], OUT_LAYERS_B)


def test_dense_parity_sharded_untied_any_layer_order(tmp_path, tok_dir):
    """Sharded transformers checkpoint with its own lm_head; out_layers in any order, with 0."""
    cfg = dict(CONFIG_B, tie_word_embeddings=False)
    model_dir = write_qwen3_dense(tmp_path, cfg, seed=2, max_shard_size="20KB")
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1
    out_layers = (2, 0, 1)
    encoder = TextEncoder.from_pretrained(
        model_dir, tok_dir, dtype=mx.float32, out_layers=out_layers, max_length=40
    )
    check_parity(encoder, model_dir, PROMPTS[:2], out_layers)


def test_mlx4bit_parity(tmp_path, tok_dir):
    model_dir = write_qwen3_mlx4bit(tmp_path, CONFIG_Q4, seed=3)
    encoder = TextEncoder.from_pretrained(
        model_dir, tok_dir, dtype=mx.float32, out_layers=OUT_LAYERS_B, max_length=64
    )
    trunk = encoder.model.model
    assert isinstance(trunk.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(trunk.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(trunk.layers[2].mlp.down_proj, nn.QuantizedLinear)
    assert (trunk.layers[0].mlp.up_proj.group_size, trunk.layers[0].mlp.up_proj.bits) == (64, 4)
    check_parity(encoder, model_dir, PROMPTS[2:4], OUT_LAYERS_B)


def test_bf16_default_dtype(dense_dir, tok_dir):
    encoder = TextEncoder.from_pretrained(
        dense_dir, tok_dir, out_layers=OUT_LAYERS_B, max_length=40
    )
    out = encoder(PROMPTS[0])
    assert out.dtype == mx.bfloat16 and out.shape == (1, 40, 96)
    ids, mask = encoder.tokenize(PROMPTS[0])
    hidden = reference_hidden(dense_dir, ids, mask)
    ref = np.concatenate([hidden[k] for k in OUT_LAYERS_B], axis=-1)
    # bf16 rounds every op to 8 significant bits (2^-9); after 3 layers this measures 7.8e-3, and
    # a wrong mask, layer or norm gives errors of order 1 (see the float32 parity tests).
    assert rel_err(np.array(out.astype(mx.float32)), ref) <= 2**-5


# ---- loading ----


def test_sanitize_drops_exactly_the_unused_tensors():
    model = Qwen3Encoder(ModelArgs.from_dict(dict(CONFIG_B, model_type="qwen3")), OUT_LAYERS_B)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)
    ]
    kept = model.sanitize({n: mx.zeros(1) for n in names})
    # Layer 4 does not exist in a 4-layer config: it stays, and load_into refuses it.
    assert sorted(kept) == sorted(
        ["model.embed_tokens.weight"]
        + [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2, 4)]
    )


def test_unexpected_checkpoint_key_is_an_error(tmp_path):
    model_dir = write_qwen3_mlx4bit(tmp_path, CONFIG_Q4, seed=4)
    weights = mx.load(str(model_dir / "model.safetensors"))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.zeros(8)
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)
    with pytest.raises(WeightsError, match="unexpected weight 'model.layers.0.self_attn.rotary"):
        load_qwen3_encoder(model_dir, out_layers=OUT_LAYERS_B)


def test_parameter_count_of_qwen3_4b_as_built():
    """Embedding + decoder layers 0..26 of Qwen3-4B (architecture.md §4.3), never evaluated."""
    model = Qwen3Encoder(ModelArgs.from_dict(QWEN3_4B))
    assert len(model.model.layers) == 27 and model.width == 7680
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 3_114_088_192


# ---- bad input ----


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}.*'tokenizer.json' not found"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_chat_template(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match=f"{tmp_path}: the tokenizer has no chat template"):
        load_tokenizer(tmp_path)


def test_unreadable_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt(tokenizer, prompt):
    with pytest.raises(PromptError, match="the prompt is empty"):
        tokenize_prompts(tokenizer, prompt)


def test_prompt_not_a_string_and_no_prompt(tokenizer):
    with pytest.raises(PromptError, match="must be a string, got int"):
        tokenize_prompts(tokenizer, ["ok", 3])
    with pytest.raises(PromptError, match="no prompt given"):
        tokenize_prompts(tokenizer, [])


def test_group_size_must_divide_width(tmp_path):
    model_dir = write_qwen3_mlx4bit(tmp_path, CONFIG_B, seed=5, group_size=32)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization"]["group_size"] = 64
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="layer 'model.embed_tokens' has input width 32.*64"):
        load_qwen3_encoder(model_dir, out_layers=OUT_LAYERS_B)


def test_quantized_tensors_without_quantization_config(tmp_path):
    model_dir = write_qwen3_mlx4bit(tmp_path, CONFIG_Q4, seed=6)
    config = json.loads((model_dir / "config.json").read_text())
    del config["quantization"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"\.scales' is a quantized tensor.*no 'quantization'"):
        load_qwen3_encoder(model_dir, out_layers=OUT_LAYERS_B)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("head_dim"), "required field 'head_dim' is missing"),
        (lambda c: c.update(model_type="llama"), "model_type is 'llama', expected a 'qwen3'"),
        (lambda c: c.pop("rope_parameters"), "required field 'rope_theta' is missing"),
    ],
)
def test_bad_config(dense_dir, tmp_path, edit, message):
    config = json.loads((dense_dir / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(dense_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=message):
        load_qwen3_encoder(tmp_path, out_layers=OUT_LAYERS_B)


@pytest.mark.parametrize("out_layers", [(), (1, 4), (-1,)])
def test_out_layers_out_of_range(dense_dir, out_layers):
    with pytest.raises(ConfigError, match=r"hidden-state index in 0\.\.3"):
        load_qwen3_encoder(dense_dir, out_layers=out_layers)


def test_bad_ids_and_mask(dense_dir, tokenizer):
    encoder = TextEncoder(load_qwen3_encoder(dense_dir, mx.float32, OUT_LAYERS_B), tokenizer, 8)
    ids = mx.array([[1, 2, 3, 4]])
    cases = [
        (ids[0], mx.ones(4), "must both have shape"),
        (ids, mx.ones((1, 3)), "must both have shape"),
        (ids, mx.array([[1, 1, 2, 0]]), "may only hold 0"),
        (ids, mx.array([[0, 1, 1, 1]]), "must start with a real token"),
        (mx.array([[1, 2, 512, 4]]), mx.ones((1, 4)), r"0\.\.511"),
    ]
    for bad_ids, bad_mask, message in cases:
        with pytest.raises(PromptError, match=message):
            encoder.encode(bad_ids, bad_mask)
    with pytest.raises(ConfigError, match="max_length must be a positive integer"):
        TextEncoder(encoder.model, tokenizer, 0)
