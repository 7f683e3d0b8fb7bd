"""The MLX transformer against diffusers' Flux2Transformer2DModel on tiny random models."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err
from mlx.utils import tree_flatten
from tiny_transformer import TINY, write_transformer

from mlx_bonsai.convert.sizes import FULL_CONFIG
from mlx_bonsai.errors import ConfigError, WeightsError
from mlx_bonsai.transformer import (
    Transformer,
    TransformerConfig,
    image_ids,
    load_transformer,
    pack_latents,
    text_ids,
    unpack_latents,
)
from mlx_bonsai.weights import read_json


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("transformer")
    model = write_transformer(directory)
    return directory, model


def reference(model, x, ctx, t, txt, img):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(ctx),
            timestep=torch.from_numpy(t),
            img_ids=torch.from_numpy(img),
            txt_ids=torch.from_numpy(txt),
            return_dict=False,
        )[0]
    return out.float().numpy()


def inputs(batch, h, w, n_txt, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h * w, TINY["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((batch, n_txt, TINY["joint_attention_dim"])).astype(np.float32)
    t = rng.uniform(0.1, 1.0, batch).astype(np.float32)
    return x, ctx, t, text_ids(n_txt), image_ids(h, w)


@pytest.mark.parametrize(
    "batch,h,w,n_txt",
    [(1, 4, 4, 8), (2, 3, 5, 8), (1, 6, 2, 64), (2, 4, 7, 64)],
)
def test_matches_diffusers_float32(checkpoint, batch, h, w, n_txt):
    directory, ref_model = checkpoint
    model = load_transformer(directory, dtype=mx.float32)
    x, ctx, t, txt, img = inputs(batch, h, w, n_txt)
    ours = model(mx.array(x), mx.array(ctx), mx.array(t), model.rope(txt, img))
    expected = reference(ref_model, x, ctx, t, txt, img)
    assert ours.shape == expected.shape
    assert rel_err(ours, expected) <= 1e-5


def test_evaluate_blocks_computes_the_same_step(checkpoint, monkeypatch):
    """Low-memory mode evaluates each block in parts, one at a time (double blocks: attention,
    feed-forward; single blocks: MLP projection, attention, output), the same output bit for
    bit."""
    directory, _ = checkpoint
    model = load_transformer(directory, dtype=mx.float32)
    x, ctx, t, txt, img = inputs(1, 4, 4, 8)
    x, ctx, t, rope = mx.array(x), mx.array(ctx), mx.array(t), model.rope(txt, img)
    whole = model(x, ctx, t, rope)
    mx.eval(whole)
    events = []
    real_async_eval, real_synchronize = mx.async_eval, mx.synchronize
    monkeypatch.setattr(mx, "async_eval", lambda *a: (events.append("queue"), real_async_eval(*a)))
    monkeypatch.setattr(mx, "synchronize", lambda *a: (events.append("wait"), real_synchronize(*a)))
    per_block = model(x, ctx, t, rope, evaluate_blocks=True)
    parts = 2 * TINY["num_layers"] + 3 * TINY["num_single_layers"]
    # Each part is queued only after all work before it has finished: one part in flight.
    assert events == ["wait", "queue"] * parts and parts >= 5
    monkeypatch.undo()
    assert np.array_equal(np.asarray(per_block), np.asarray(whole))


def test_matches_diffusers_bfloat16(checkpoint):
    directory, _ = checkpoint
    ref_model = write_transformer(directory.parent / "bf16_copy").to(torch.bfloat16)
    model = load_transformer(directory, dtype=mx.bfloat16)
    x, ctx, t, txt, img = inputs(1, 4, 6, 16)
    ours = model(
        mx.array(x).astype(mx.bfloat16),
        mx.array(ctx).astype(mx.bfloat16),
        mx.array(t),
        model.rope(txt, img),
    )
    with torch.no_grad():
        expected = (
            ref_model(
                hidden_states=torch.from_numpy(x).bfloat16(),
                encoder_hidden_states=torch.from_numpy(ctx).bfloat16(),
                timestep=torch.from_numpy(t).bfloat16(),
                img_ids=torch.from_numpy(img),
                txt_ids=torch.from_numpy(txt),
                return_dict=False,
            )[0]
            .float()
            .numpy()
        )
    assert ours.dtype == mx.bfloat16
    assert rel_err(ours.astype(mx.float32), expected) <= 2e-2


def test_positions_and_packing():
    ids = image_ids(2, 3)
    assert ids.tolist() == [
        [0, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 2, 0],
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 2, 0],
    ]
    assert text_ids(3).tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    lat = mx.random.normal((2, 128, 3, 5))
    tokens = pack_latents(lat)
    assert tokens.shape == (2, 15, 128)
    # token y*w + x holds latent pixel (y, x)
    assert mx.array_equal(tokens[:, 1 * 5 + 4], lat[:, :, 1, 4])
    assert mx.array_equal(unpack_latents(tokens, 3, 5), lat)


def test_full_size_parameter_count():
    cfg = TransformerConfig.from_dict(FULL_CONFIG)
    model = Transformer(cfg)  # lazily initialised: nothing is materialised
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 3_875_544_576


def _write_config(directory, **changes):
    cfg = read_json(directory / "config.json")
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_layers": None}, "required field 'num_layers' is missing"),
        ({"axes_dims_rope": [8, 8, 8, 4]}, "axes_dims_rope [8, 8, 8, 4] sums to 28"),
        ({"num_attention_heads": "2"}, "'num_attention_heads' must be a non-negative integer"),
        ({"guidance_embeds": True}, "guidance_embeds is true"),
        ({"patch_size": 2}, "patch_size must be 1"),
    ],
)
def test_bad_config(tmp_path, checkpoint, changes, message):
    directory, _ = checkpoint
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        load_transformer(tmp_path)
    assert message in str(err.value)


def _save(directory, weights):
    mx.save_safetensors(str(directory / "diffusion_pytorch_model.safetensors"), weights)


@pytest.mark.parametrize(
    "edit,message",
    [
        ("drop", "weight 'proj_out.weight' is missing"),
        ("extra", "unexpected weight 'proj_out.bias'"),
        ("shape", "weight 'x_embedder.weight' has shape (64, 96), the config expects (64, 128)"),
        ("drop_k", "weight 'transformer_blocks.1.attn.to_k.weight' is missing"),
        ("mixed", "'transformer_blocks.0.attn.add_q_proj.scales' is missing: the q, k, v "
                  "projections of a stream must be stored alike"),
        ("widths", "transformer_blocks.0.attn.to_q, transformer_blocks.0.attn.to_k, "
                   "transformer_blocks.0.attn.to_v must be stored alike"),
    ],
)
def test_bad_weights(tmp_path, checkpoint, edit, message):
    directory, _ = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    weights = mx.load(str(directory / "diffusion_pytorch_model.safetensors"))
    if edit == "drop":
        del weights["proj_out.weight"]
    elif edit == "extra":
        weights["proj_out.bias"] = mx.zeros((128,))
    elif edit == "shape":
        weights["x_embedder.weight"] = mx.zeros((64, 96))
    elif edit == "drop_k":
        del weights["transformer_blocks.1.attn.to_k.weight"]
    elif edit == "mixed":  # one of three looks packed
        weights["transformer_blocks.0.attn.add_k_proj.scales"] = mx.zeros((64, 1))
    else:
        weights["transformer_blocks.0.attn.to_v.weight"] = mx.zeros((64, 96))
    _save(tmp_path, weights)
    with pytest.raises(WeightsError) as err:
        load_transformer(tmp_path)
    assert message in str(err.value)


def test_qkv_projections_fused_at_load(tmp_path, checkpoint):
    """Each stream's q, k, v linears become one linear, rows in that order; a checkpoint saved
    from the model itself (already fused) loads too."""
    directory, _ = checkpoint
    weights = mx.load(str(directory / "diffusion_pytorch_model.safetensors"))
    model = load_transformer(directory, dtype=mx.float32)
    for block, (fused, parts) in [(0, ("to_qkv", ("to_q", "to_k", "to_v"))),
                                  (1, ("add_qkv_proj", ("add_q_proj", "add_k_proj",
                                                        "add_v_proj")))]:
        expected = mx.concatenate(
            [weights[f"transformer_blocks.{block}.attn.{p}.weight"] for p in parts]
        )
        got = getattr(model.transformer_blocks[block].attn, fused).weight
        assert mx.array_equal(got, expected.astype(mx.float32))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    _save(tmp_path, dict(tree_flatten(model.parameters())))
    again = load_transformer(tmp_path, dtype=mx.float32)
    x, ctx, t, txt, img = inputs(1, 4, 4, 8)
    args = mx.array(x), mx.array(ctx), mx.array(t), model.rope(txt, img)
    assert mx.array_equal(again(*args), model(*args))
