"""Tiny offline stand-ins for the published text-encoder files, in their exact on-disk layouts.

- `write_tokenizer(dir)`: a byte-level Qwen2Tokenizer (256 byte symbols + Qwen3's specials, no
  merges) with a Qwen3-compatible chat template, saved by transformers (tokenizer.json,
  tokenizer_config.json, chat_template.jinja).
- `write_qwen3_dense(dir, cfg, seed)`: a transformers Qwen3ForCausalLM checkpoint (config.json +
  model.safetensors, or sharded model-0000x-of-0000y.safetensors with an index), saved by
  transformers.
- `write_qwen3_mlx4bit(dir, cfg, seed)`: the mlx-lm layout of PrismML's text_encoder-mlx-4bit/
  (model.safetensors with `model.*` keys, affine 4-bit, group 64, embedding quantized too;
  config.json with a `quantization` entry).
- `reference_qwen3(dir)`: transformers' Qwen3ForCausalLM (float32) holding the weights a directory
  written above represents (dequantized for the 4-bit layout), as the parity reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

# Byte-level tokenizer ids: 0..255 bytes, then the specials in this order.
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]

# One user/system/assistant turn per message, generation prompt, and an empty think block when
# thinking is disabled: the part of Qwen3's template that FLUX.2 klein exercises.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}"""

# architecture.md §8 config B: GQA (4 query heads on 2 kv heads), out_layers (1, 2, 3) leave one
# final layer unused, as (9, 18, 27) do in Qwen3-4B.
CONFIG_B = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)

# Every quantized width (hidden 64, intermediate 128) is a multiple of the group size 64.
CONFIG_Q4 = dict(CONFIG_B, hidden_size=64, intermediate_size=128, head_dim=16)

OUT_LAYERS_B = (1, 2, 3)


def write_tokenizer(directory: str | Path) -> Path:
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[SPECIALS[0]] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def qwen3_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights under transformers' Qwen3ForCausalLM names.

    Linear weights have std 1/sqrt(fan_in) so activations stay O(1) through the layers; every norm
    weight is perturbed around 1 so a wrong or missing norm cannot go unnoticed.
    """
    rng = np.random.default_rng(seed)
    h, m, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {
        "model.embed_tokens.weight": rng.standard_normal((cfg["vocab_size"], h)).astype(np.float32)
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = linear(q, h)
        w[p + "self_attn.k_proj.weight"] = linear(kv, h)
        w[p + "self_attn.v_proj.weight"] = linear(kv, h)
        w[p + "self_attn.o_proj.weight"] = linear(h, q)
        w[p + "self_attn.q_norm.weight"] = norm(d)
        w[p + "self_attn.k_norm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = linear(m, h)
        w[p + "mlp.up_proj.weight"] = linear(m, h)
        w[p + "mlp.down_proj.weight"] = linear(h, m)
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = (
        w["model.embed_tokens.weight"]
        if cfg["tie_word_embeddings"]
        else linear(cfg["vocab_size"], h)
    )
    return w


def _torch_model(cfg: dict, weights: dict[str, np.ndarray]):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.float32)
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True
    )
    return model.eval()


def write_qwen3_dense(
    directory: str | Path,
    cfg: dict,
    seed: int,
    dtype: str = "float32",
    max_shard_size: str | None = None,
) -> Path:
    """Saved by transformers itself; a tied checkpoint has no lm_head.weight, an untied one has."""
    import torch

    model = _torch_model(cfg, qwen3_weights(cfg, seed)).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return Path(directory)


def write_qwen3_mlx4bit(directory: str | Path, cfg: dict, seed: int, group_size: int = 64) -> Path:
    """mlx-lm's quantized layout: every linear and the embedding as uint32 weight + bf16 scales and
    biases (affine, 4 bits); norms in bf16; no lm_head when the embeddings are tied."""
    from transformers import Qwen3Config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in qwen3_weights(cfg, seed).items():
        if key == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        w = mx.array(value).astype(mx.bfloat16)
        if w.ndim == 2:
            prefix = key[: -len(".weight")]
            packed, scales, biases = mx.quantize(w, group_size=group_size, bits=4)
            tensors[key], tensors[prefix + ".scales"], tensors[prefix + ".biases"] = (
                packed,
                scales,
                biases,
            )
        else:
            tensors[key] = w
    mx.save_safetensors(str(directory / "model.safetensors"), tensors, metadata={"format": "mlx"})
    config = Qwen3Config(**cfg).to_dict()
    config["quantization"] = config["quantization_config"] = {"group_size": group_size, "bits": 4}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def reference_qwen3(directory: str | Path):
    """transformers' float32 Qwen3ForCausalLM with the weights stored in `directory`.

    Dense checkpoints go through transformers' own loader; the 4-bit layout is dequantized
    (scales and biases upcast to float32 first, so the reference weights are exactly scale*q+bias).
    """
    import torch
    from transformers import Qwen3ForCausalLM

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    quant = config.get("quantization")
    if quant is None:
        return Qwen3ForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    stored = mx.load(str(directory / "model.safetensors"))
    weights = {}
    for key, value in stored.items():
        if key.endswith((".scales", ".biases")):
            continue
        prefix = key[: -len(".weight")]
        if prefix + ".scales" in stored:
            value = mx.dequantize(
                value,
                stored[prefix + ".scales"].astype(mx.float32),
                stored[prefix + ".biases"].astype(mx.float32),
                group_size=quant["group_size"],
                bits=quant["bits"],
            )
        weights[key] = np.array(value.astype(mx.float32))
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return _torch_model(cfg, weights)
