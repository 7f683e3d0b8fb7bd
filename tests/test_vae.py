"""FLUX.2 VAE: parity with diffusers' AutoencoderKLFlux2 through the real loading path, tiled
decoding, parameter count of the real config, and bad input.

All parity checks run float32 on random weights written in the published diffusers layout
(tests/tiny_vae.py) and loaded with `load_vae`; tolerance: relative error (max|a-b| / max|b|)
<= 1e-5.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err
from diffusers import Flux2KleinPipeline
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file
from tiny_vae import CONFIG_B, CONFIG_SMALL_DECODER, write_vae

from mlx_bonsai import BonsaiError, ConfigError, WeightsError
from mlx_bonsai import vae as V

TOL = 1e-5

# FLUX.2 decoder geometry at toy width: 4 up blocks, 3 resnets each, so the tiled decoder
# is cut into the same segments as the real one (checked below).
CONFIG_4_BLOCKS = dict(
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=32,
    norm_num_groups=4,
)

# vae/config.json of FLUX.2 [klein] (architecture.md §2.2).
REAL_CONFIG = {
    "_class_name": "AutoencoderKLFlux2",
    "act_fn": "silu",
    "batch_norm_eps": 0.0001,
    "batch_norm_momentum": 0.1,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 32,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "patch_size": [2, 2],
    "sample_size": 1024,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, diffusers reference model)."""
    out = {}
    for name, cfg, decoder_only in (
        ("b", CONFIG_B, False),
        ("small", CONFIG_SMALL_DECODER, False),
        ("decoder_only", CONFIG_SMALL_DECODER, True),
        ("4blocks", CONFIG_4_BLOCKS, True),
    ):
        directory = tmp_path_factory.mktemp(name)
        out[name] = (directory, write_vae(directory, cfg, seed=len(out), decoder_only=decoder_only))
    return out


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def reference_decode(ref, packed: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The Klein pipeline's decode: BN de-normalise, unpatchify, vae.decode, (x+1)/2 clamp."""
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    z = Flux2KleinPipeline._unpatchify_latents(nchw(packed) * std + mean)
    with torch.no_grad():
        raw = ref.decode(z).sample
    return z, nhwc((raw * 0.5 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("name", ["b", "small", "decoder_only"])
@pytest.mark.parametrize("shape", [(2, 4, 4), (1, 3, 5)])
def test_decode_matches_diffusers(checkpoints, name, shape):
    directory, ref = checkpoints[name]
    vae = V.load_vae(directory, dtype=mx.float32)
    packed = np.random.randn(*shape, 128).astype(np.float32)
    z, want = reference_decode(ref, packed)

    got = np.array(vae.decode(mx.array(packed)))
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL
    # The clip must not hide the comparison: most pixels lie strictly inside (0, 1).
    assert ((want > 0) & (want < 1)).mean() > 0.9 and want.std() > 0.05

    with torch.no_grad():
        raw = nhwc(ref.decode(z).sample)
    assert rel_err(vae.decode_latents(mx.array(nhwc(z))), raw) <= TOL


@pytest.mark.parametrize("name", ["b", "small"])
@pytest.mark.parametrize("size", [(32, 32), (16, 48)])
def test_encode_matches_diffusers(checkpoints, name, size):
    directory, ref = checkpoints[name]
    vae = V.load_vae(directory, dtype=mx.float32)
    image = np.random.rand(2, *size, 3).astype(np.float32)
    with torch.no_grad():
        mean = ref.encode(nchw(image) * 2 - 1).latent_dist.mode()
    bn_mean = ref.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    want = (Flux2KleinPipeline._patchify_latents(mean) - bn_mean) / bn_std

    got = np.array(vae.encode(mx.array(image)))
    f = 2 * vae.config.scale_factor  # image pixels per packed latent pixel (16 for FLUX.2)
    assert got.shape == (2, size[0] // f, size[1] // f, 128)
    assert rel_err(got, nhwc(want)) <= TOL
    assert rel_err(vae.encode_latents(mx.array(image * 2 - 1)), nhwc(mean)) <= TOL


def test_patchify_layout_matches_pipeline():
    z = np.random.randn(2, 32, 6, 10).astype(np.float32)
    want = Flux2KleinPipeline._patchify_latents(torch.from_numpy(z))
    got = V.patchify(mx.array(z.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.array(got), nhwc(want))
    np.testing.assert_array_equal(np.array(V.unpatchify(got)), z.transpose(0, 2, 3, 1))
    # packed channel c*4 + dy*2 + dx at (y, x) is latent channel c at (2y + dy, 2x + dx)
    assert np.array(got)[1, 2, 3, 5 * 4 + 1 * 2 + 0] == z[1, 5, 2 * 2 + 1, 3 * 2 + 0]


def test_bn_round_trip(checkpoints):
    vae = V.load_vae(checkpoints["b"][0], dtype=mx.float32)
    z = mx.random.normal((1, 3, 4, 128))
    assert rel_err(vae.bn.normalize(vae.bn.denormalize(z)), z) <= 1e-6


def test_checkpoint_kinds(checkpoints):
    full = V.load_vae(checkpoints["small"][0], dtype=mx.float32)
    assert full.has_encoder and "quant_conv" in full
    assert full.config.decoder_block_out_channels == (24, 48)
    assert full.config.block_out_channels == (32, 64)

    dec = V.load_vae(checkpoints["decoder_only"][0], dtype=mx.float32)
    assert not dec.has_encoder and "quant_conv" not in dec
    with pytest.raises(WeightsError, match="decoder-only"):
        dec.encode(mx.zeros((1, 32, 32, 3)))


def test_bfloat16_decode_close_to_float32(checkpoints):
    directory = checkpoints["b"][0]
    packed = mx.random.normal((1, 4, 4, 128))
    want = V.load_vae(directory, dtype=mx.float32).decode(packed)
    got = V.load_vae(directory).decode(packed)  # default dtype: bfloat16
    assert got.dtype == mx.float32
    assert float(mx.abs(got - want).mean()) < 4e-3


def test_chunked_attention_is_exact(monkeypatch):
    q, k, v = (mx.random.normal((2, 1, 50, 16)) for _ in range(3))
    whole = V.attention(q, k, v)
    monkeypatch.setattr(V, "_ATTENTION_SCORES_PER_CALL", 7 * 50)  # 8 calls, the last one short
    assert rel_err(V.attention(q, k, v), whole) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Tiled decoding


def structured_latents(b: int, h: int, w: int) -> mx.array:
    """Noise plus smooth structure, so that per-tile GroupNorm statistics would differ."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    field = np.stack([np.tanh((x - w / 2) / 2), np.sin(y / 2), (x + y) / (h + w)], axis=-1)
    lat = rng.standard_normal((b, h, w, 128)) + 1.5 * field @ rng.standard_normal((3, 128))
    return mx.array(lat.astype(np.float32))


def test_tiled_segments_match_real_decoder(checkpoints):
    real = V.VAE(V.VAEConfig.from_dict(REAL_CONFIG), with_encoder=False)
    small_config = dict(REAL_CONFIG, decoder_block_out_channels=[96, 192, 384, 384])
    small = V.VAE(V.VAEConfig.from_dict(small_config), with_encoder=False)
    toy = V.load_vae(checkpoints["4blocks"][0], dtype=mx.float32)
    lengths = [[len(s) for s in V._segments(m.decoder.stages())] for m in (real, small, toy)]
    assert lengths[0] == lengths[1] == lengths[2] == [1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 5]
    # [r0] [r1] [r2] [upsample] [r0] [r1] [r2] [upsample, r0] [r1] [r2] [upsample, r0, r1, r2, out]
    halos = [V._halo(s) for s in V._segments(real.decoder.stages())]
    assert halos == [2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 4]


@pytest.mark.parametrize("tile_size", [16, 40, 64])
def test_tiled_decode_equals_untiled(checkpoints, tile_size):
    """Many tiles (tile 16 px: 2 latent pixels per core at the first segments, 8 at the last)
    on a non-square, non-uniform latent: tiled and untiled agree to float rounding."""
    vae = V.load_vae(checkpoints["4blocks"][0], dtype=mx.float32)
    packed = structured_latents(2, 6, 5)
    want = vae.decode(packed)
    got = vae.decode(packed, tile_size=tile_size)
    assert got.shape == want.shape == (2, 96, 80, 3)
    assert rel_err(got, want) <= TOL


def test_tiled_decode_lowers_peak_memory(checkpoints):
    vae = V.load_vae(checkpoints["4blocks"][0], dtype=mx.float32)
    packed = structured_latents(2, 6, 5)
    peaks = []
    for tile_size in (None, 16):
        mx.eval(packed)
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(vae.decode(packed, tile_size=tile_size))
        peaks.append(mx.get_peak_memory())
    assert peaks[1] < 0.5 * peaks[0]


def test_tile_statistics_are_image_wide(checkpoints, monkeypatch):
    """Why the sweeps exist: normalising each tile with its own statistics is visibly wrong on
    this latent (so the equality above is not a property of the input)."""
    vae = V.load_vae(checkpoints["4blocks"][0], dtype=mx.float32)
    packed = structured_latents(1, 6, 5)
    want = vae.decode(packed)

    def own_statistics(self, norm, x):
        return norm.normalize(x, *norm.statistics(x))

    monkeypatch.setattr(V._TileNorms, "__call__", own_statistics)
    per_tile = vae.decode(packed, tile_size=16)
    assert float(mx.abs(per_tile - want).mean()) > 1 / 255


# ---------------------------------------------------------------------------------------------
# Real config: parameter count without materialising weights


def test_parameter_count_of_real_config():
    before = mx.get_active_memory()
    vae = V.VAE(V.VAEConfig.from_dict(REAL_CONFIG))
    params = dict(tree_flatten(vae.trainable_parameters()))

    def count(*prefixes):
        return sum(v.size for k, v in params.items() if k.startswith(prefixes))

    assert count("") == 84_046_115  # BatchNorm running statistics are buffers, not counted
    # architecture.md §5.5 subtotals (they leave out quant_conv and post_quant_conv)
    assert count("encoder.") == 34_421_696 and count("quant_conv.") == 4_160
    assert count("decoder.") == 49_619_203 and count("post_quant_conv.") == 1_056
    assert count("decoder.up_blocks.0.") == 16_524_800
    buffers = {k: v.size for k, v in tree_flatten(vae.parameters()) if k not in params}
    assert buffers == {"bn.running_mean": 128, "bn.running_var": 128}
    assert mx.get_active_memory() - before < 2**20  # lazily initialised, nothing allocated


# ---------------------------------------------------------------------------------------------
# Bad input


def rewrite(directory, config=None, drop=(), change=None):
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    path = directory / "diffusion_pytorch_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    tensors.update(change or {})
    save_file(tensors, path)


@pytest.fixture
def fresh(tmp_path):
    write_vae(tmp_path, CONFIG_B, seed=3)
    return tmp_path, json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("field", ["latent_channels", "block_out_channels", "batch_norm_eps"])
def test_missing_config_field(fresh, field):
    directory, config = fresh
    del config[field]
    rewrite(directory, config)
    with pytest.raises(ConfigError, match=f"'{field}' is missing"):
        V.load_vae(directory)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"patch_size": [1, 1]}, "patch_size"),
        ({"norm_num_groups": 5}, "divisible by norm_num_groups"),
        ({"decoder_block_out_channels": [32]}, "same length"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"use_quant_conv": "yes"}, "use_quant_conv"),
    ],
)
def test_bad_config_values(fresh, change, message):
    directory, config = fresh
    rewrite(directory, {**config, **change})
    with pytest.raises(ConfigError, match=message):
        V.load_vae(directory)


def test_missing_unexpected_and_misshapen_weights(fresh):
    directory, _ = fresh
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    rewrite(directory, drop=[key])
    with pytest.raises(WeightsError, match=f"'{key}' is missing"):
        V.load_vae(directory)

    rewrite(directory, change={key: torch.zeros(32, 64, 3, 3)})
    with pytest.raises(WeightsError, match=f"'{key}' has shape"):
        V.load_vae(directory)

    rewrite(directory, change={key: torch.zeros(32, 64, 1, 1), "decoder.extra": torch.zeros(1)})
    with pytest.raises(WeightsError, match="unexpected weight 'decoder.extra'"):
        V.load_vae(directory)


def test_encoder_parts_without_encoder(tmp_path):
    write_vae(tmp_path, CONFIG_B, seed=4, decoder_only=True)
    rewrite(tmp_path, change={"quant_conv.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(WeightsError, match="unexpected weight 'quant_conv.weight'"):
        V.load_vae(tmp_path)


def test_bad_call_arguments(checkpoints):
    vae = V.load_vae(checkpoints["b"][0], dtype=mx.float32)
    with pytest.raises(BonsaiError, match=r"\(B, h, w, 128\)"):
        vae.decode(mx.zeros((1, 128, 4, 4)))  # NCHW by mistake
    with pytest.raises(BonsaiError, match="H and W multiples of 4"):
        vae.encode(mx.zeros((1, 22, 32, 3)))  # config B: multiples of 4
    with pytest.raises(BonsaiError, match="tile_size"):
        vae.decode(mx.zeros((1, 4, 4, 128)), tile_size=3)  # not a multiple of 2 (2 up blocks)
    with pytest.raises(BonsaiError, match="tile_size"):
        vae.decode(mx.zeros((1, 4, 4, 128)), tile_size=True)
