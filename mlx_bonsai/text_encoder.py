"""The Qwen3 text encoder of FLUX.2 klein: prompt -> chat template -> tokens -> hidden states.

FLUX.2 klein never uses Qwen3's logits. It reads the residual stream after a few decoder layers
((9, 18, 27) for Qwen3-4B; index 0 is the embedding output) and concatenates them per token. So only
the embedding and the first max(out_layers) decoder layers are built; the later layers, the final
norm and lm_head are dropped from the checkpoint at load. The decoder blocks are mlx-lm's Qwen3
modules; only the layer loop, the padding mask and the layer selection live here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.qwen3 import ModelArgs, TransformerBlock
from transformers import Qwen2Tokenizer

from .errors import ConfigError, PromptError, WeightsError
from .weights import cast_floats, load_into, load_safetensors_dir, read_json, require

DEFAULT_OUT_LAYERS = (9, 18, 27)
DEFAULT_MAX_LENGTH = 512

_REQUIRED_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)


class Qwen3Trunk(nn.Module):
    """The embedding and the first `num_layers` decoder layers of transformers' Qwen3Model."""

    def __init__(self, args: ModelArgs, num_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(num_layers)]


def attention_bias(mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """Additive (B, 1, L, L) bias: query i sees key j iff j <= i and mask[b, j] == 1.

    Padded query rows are computed like any other (they see every real token before them), because
    FLUX.2 klein keeps their hidden states in the prompt embedding.
    """
    pos = mx.arange(mask.shape[-1])
    allowed = (pos[None, :] <= pos[:, None])[None] & (mask[:, None, :] != 0)
    bias = mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
    return bias[:, None]


class Qwen3Encoder(nn.Module):
    """Token ids -> concatenated hidden states after the decoder layers in `out_layers`."""

    def __init__(self, args: ModelArgs, out_layers: Sequence[int] = DEFAULT_OUT_LAYERS):
        super().__init__()
        out_layers = tuple(out_layers)
        n = args.num_hidden_layers
        # Index n would be transformers' final-normed output, which this trunk does not build.
        if not out_layers or not all(isinstance(k, int) and 0 <= k < n for k in out_layers):
            raise ConfigError(
                f"out_layers {out_layers}: each entry must be a hidden-state index in 0..{n - 1} "
                "(0 is the embedding output, k the output of decoder layer k)"
            )
        self.args = args
        self.out_layers = out_layers
        self.model = Qwen3Trunk(args, max(out_layers))

    @property
    def width(self) -> int:
        return len(self.out_layers) * self.args.hidden_size

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        h = self.model.embed_tokens(ids)
        bias = attention_bias(mask, h.dtype)
        hidden = [h]
        for layer in self.model.layers:
            h = layer(h, bias)
            hidden.append(h)
        return mx.concatenate([hidden[k] for k in self.out_layers], axis=-1)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop exactly the checkpoint tensors that are never used: decoder layers past the last
        output layer, the final norm and lm_head. Anything else unexpected fails in load_into."""
        unused = ("model.norm.", "lm_head.") + tuple(
            f"model.layers.{i}." for i in range(len(self.model.layers), self.args.num_hidden_layers)
        )
        return {k: v for k, v in weights.items() if not k.startswith(unused)}


def _rope_theta(config: dict[str, Any]) -> float | None:
    # transformers >= 5 nests rope_theta under rope_parameters.
    return config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")


def _quantize(
    model: nn.Module, weights: dict[str, mx.array], quant: dict[str, Any], where: str
) -> None:
    """Swap in QuantizedLinear/QuantizedEmbedding wherever the checkpoint has `.scales`."""
    require(quant, ("group_size", "bits"), f"{where} 'quantization'")
    group_size, bits = quant["group_size"], quant["bits"]

    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        width = module.weight.shape[-1]
        if width % group_size:
            raise WeightsError(
                f"{where}: layer '{path}' has input width {width}, which the quantization "
                f"group_size {group_size} does not divide"
            )
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


def load_qwen3_encoder(
    te_dir: str | Path,
    dtype: mx.Dtype = mx.bfloat16,
    out_layers: Sequence[int] = DEFAULT_OUT_LAYERS,
) -> Qwen3Encoder:
    """Load a Qwen3 checkpoint directory: dense (transformers layout, one file or sharded) or
    MLX-quantized (mlx-lm layout, `quantization` in config.json). Floats are cast to `dtype`."""
    te_dir = Path(te_dir)
    config_path = te_dir / "config.json"
    config = read_json(config_path)
    require(config, _REQUIRED_FIELDS, str(config_path))
    if config["model_type"] != "qwen3":
        raise ConfigError(
            f"{config_path}: model_type is '{config['model_type']}', "
            "expected a 'qwen3' text encoder"
        )
    if _rope_theta(config) is None:
        raise ConfigError(f"{config_path}: required field 'rope_theta' is missing")
    model = Qwen3Encoder(ModelArgs.from_dict(config), out_layers)

    where = str(te_dir)
    weights = model.sanitize(load_safetensors_dir(te_dir))
    quant = config.get("quantization")
    if quant is not None:
        _quantize(model, weights, quant, where)
    else:
        packed = next((k for k in weights if k.endswith(".scales")), None)
        if packed is not None:
            raise WeightsError(
                f"{where}: '{packed}' is a quantized tensor but config.json has no 'quantization' "
                'entry (expected e.g. {"group_size": 64, "bits": 4})'
            )
    load_into(model, cast_floats(weights, dtype), where)
    mx.eval(model.parameters())
    return model


def load_tokenizer(tokenizer_dir: str | Path) -> Qwen2Tokenizer:
    """Qwen3's tokenizer (transformers Qwen2Tokenizer) and its chat template from a directory."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{tokenizer_dir}: tokenizer file 'tokenizer.json' not found")
    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # tokenizers/transformers raise many unrelated types for bad files
        reason = " ".join(str(e).split())  # keep the error on one line
        raise ConfigError(f"{tokenizer_dir}: cannot load the tokenizer ({reason})") from None
    if not tokenizer.chat_template:
        raise ConfigError(
            f"{tokenizer_dir}: the tokenizer has no chat template (expected chat_template.jinja "
            "or a 'chat_template' entry in tokenizer_config.json)"
        )
    return tokenizer


def format_prompt(tokenizer: Qwen2Tokenizer, prompt: str) -> str:
    """The prompt as one user turn of the chat template, thinking disabled (as klein does)."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptError("the prompt is empty; describe the image to generate")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def tokenize_prompts(
    tokenizer: Qwen2Tokenizer, prompt: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
) -> tuple[mx.array, mx.array]:
    """Token ids and attention mask (1 = token, 0 = padding), each (B, max_length) int32.

    Each prompt is chat-formatted, right-padded with the pad token, and truncated at the end (with a
    warning saying how many tokens were lost) when longer than max_length.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise PromptError("no prompt given")
    pad = tokenizer.pad_token_id
    ids, mask = [], []
    for p in prompts:
        row = tokenizer(format_prompt(tokenizer, p))["input_ids"]
        if len(row) > max_length:
            warnings.warn(
                f"the prompt is {len(row)} tokens long after chat formatting; only the first "
                f"{max_length} are used ({len(row) - max_length} tokens dropped)",
                stacklevel=3,
            )
            row = row[:max_length]
        n_pad = max_length - len(row)
        ids.append(row + [pad] * n_pad)
        mask.append([1] * len(row) + [0] * n_pad)
    return mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.int32)


class TextEncoder:
    """Prompts -> (B, max_length, len(out_layers) * hidden) embeddings for the transformer."""

    def __init__(
        self, model: Qwen3Encoder, tokenizer: Qwen2Tokenizer, max_length: int = DEFAULT_MAX_LENGTH
    ):
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        te_dir: str | Path,
        tokenizer_dir: str | Path,
        dtype: mx.Dtype = mx.bfloat16,
        out_layers: Sequence[int] = DEFAULT_OUT_LAYERS,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> TextEncoder:
        tokenizer = load_tokenizer(tokenizer_dir)
        return cls(load_qwen3_encoder(te_dir, dtype, out_layers), tokenizer, max_length)

    def tokenize(self, prompt: str | Sequence[str]) -> tuple[mx.array, mx.array]:
        return tokenize_prompts(self.tokenizer, prompt, self.max_length)

    def encode(self, ids: mx.array, mask: mx.array) -> mx.array:
        """Embeddings of tokenized input: ids and mask of shape (B, L), mask 1 = real token."""
        ids, mask = mx.array(ids), mx.array(mask)
        if ids.ndim != 2 or ids.shape[1] == 0 or mask.shape != ids.shape:
            raise PromptError(
                f"ids and mask must both have shape (batch, length); got {tuple(ids.shape)} "
                f"and {tuple(mask.shape)}"
            )
        if not mx.all((mask == 0) | (mask == 1)).item():
            raise PromptError("the attention mask may only hold 0 (padding) and 1 (token)")
        # A row starting with padding would have a first query that may attend to no key at all.
        if not mx.all(mask[:, 0] == 1).item():
            raise PromptError("every row of the attention mask must start with a real token (1)")
        vocab = self.model.args.vocab_size
        if ids.min().item() < 0 or ids.max().item() >= vocab:
            raise PromptError(f"token ids must lie in 0..{vocab - 1} (the model's vocab_size)")
        return self.model(ids, mask)

    def __call__(self, prompt: str | Sequence[str]) -> mx.array:
        return self.encode(*self.tokenize(prompt))
