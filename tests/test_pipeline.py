"""End to end: PrismML-layout tiny models through BonsaiPipeline vs diffusers' Klein pipeline."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from tiny_packs import SCHEDULER_CONFIG, TINY_CONFIG, write_dense_klein, write_prism_transformer
from tiny_text import reference_qwen3
from transformers import Qwen2Tokenizer

from mlx_bonsai import BonsaiPipeline, kernels, quant
from mlx_bonsai.errors import BonsaiError
from mlx_bonsai.transformer import Transformer

PROMPT = "a bonsai tree on a wooden desk, soft light"


@pytest.fixture(scope="module", params=["ternary", "binary"])
def prism_model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"prism-{request.param}")
    encoded = write_prism_transformer(root, TINY_CONFIG, request.param, seed=3)
    return root, encoded


def reference_pipeline(root, encoded, te_dir="text_encoder-mlx-4bit") -> Flux2KleinPipeline:
    """diffusers' pipeline on the dense weights that the pack and the 4-bit encoder encode."""
    transformer = Flux2Transformer2DModel(
        **{k: v for k, v in TINY_CONFIG.items() if not k.startswith("_")}
    )
    transformer.load_state_dict({k: torch.from_numpy(v) for k, v in encoded.items()})
    scheduler_config = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=AutoencoderKLFlux2.from_pretrained(root / "vae").eval(),
        text_encoder=reference_qwen3(root / te_dir),
        tokenizer=Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
        transformer=transformer.eval(),
        is_distilled=True,
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("width,height", [(64, 64), (96, 64)])
def test_matches_diffusers_pipeline(prism_model, width, height):
    root, encoded = prism_model
    noise = np.random.default_rng(7).standard_normal((1, 128, height // 16, width // 16))
    noise = noise.astype(np.float32)

    ours = BonsaiPipeline.from_pretrained(str(root), dtype="float32")
    result = ours(PROMPT, width=width, height=height, steps=4, latents=mx.array(noise))
    with torch.no_grad():
        expected = reference_pipeline(root, encoded)(
            prompt=PROMPT,
            width=width,
            height=height,
            num_inference_steps=4,
            guidance_scale=1.0,
            latents=torch.from_numpy(noise),
            output_type="pil",
        ).images[0]
    got, want = np.asarray(result.image), np.asarray(expected)
    assert got.shape == want.shape == (height, width, 3)
    assert want.std() > 5  # a real picture, not a constant: the comparison means something
    assert psnr(got, want) >= 40


def test_dense_diffusers_layout_matches_diffusers(tmp_path):
    """A dense klein directory (transformer in shards, dense Qwen3) is the reference twin."""
    written = write_dense_klein(tmp_path, TINY_CONFIG, seed=5, dtype=mx.float32)
    noise = np.random.default_rng(8).standard_normal((1, 128, 4, 4)).astype(np.float32)
    ours = BonsaiPipeline.from_pretrained(str(tmp_path), dtype="float32")
    assert ours._transformer.x_embedder.storage == "dense"
    got = ours(PROMPT, width=64, height=64, latents=mx.array(noise)).image
    with torch.no_grad():
        want = reference_pipeline(tmp_path, written, te_dir="text_encoder")(
            prompt=PROMPT,
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=1.0,
            latents=torch.from_numpy(noise),
            output_type="pil",
        ).images[0]
    assert np.asarray(want).std() > 5
    assert psnr(np.asarray(got), np.asarray(want)) >= 40


def test_result_and_reuse(prism_model):
    root, _ = prism_model
    pipe = BonsaiPipeline.from_pretrained(str(root), dtype="float32")
    first = pipe(PROMPT, width=64, height=64, seed=5)
    again = pipe(PROMPT, width=64, height=64, seed=5)
    steps_done = []
    other = pipe(PROMPT, width=64, height=64, seed=6, steps=3, progress=steps_done.append)
    assert steps_done == [0, 1, 2]  # each step reported once, in order
    assert first.seed == 5 and first.image.size == (64, 64)
    assert set(first.timings) == {"load", "encode", "denoise", "decode"}
    assert set(first.peak_memory) == set(first.timings)
    assert again.timings["load"] == 0  # loaded once, reported with the first image
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    assert list(pipe._embeddings) == [PROMPT]  # the prompt was encoded once


def test_low_memory_releases_and_reloads(prism_model, monkeypatch):
    root, _ = prism_model
    # Packed weights are laid out for the device (quant.use_device_layout) except in low-memory
    # mode, which keeps the smallest, stored layout.
    laid_out, use_device_layout = [], quant.use_device_layout

    def recording_layout(model, dtype):
        laid_out.append(dtype)
        use_device_layout(model, dtype)

    monkeypatch.setattr(quant, "use_device_layout", recording_layout)
    pipe = BonsaiPipeline.from_pretrained(str(root), dtype="float32", low_memory=True)
    full = BonsaiPipeline.from_pretrained(str(root), dtype="float32")
    assert laid_out == [mx.float32]  # the full pipeline's transformer, loaded up front
    # Each step evaluates block by block, with packed layers on fused kernels only.
    modes, step = [], Transformer.__call__

    def recording_step(self, *args, evaluate_blocks=False):
        modes.append((evaluate_blocks, kernels._FUSED_ONLY.get()))
        return step(self, *args, evaluate_blocks=evaluate_blocks)

    monkeypatch.setattr(Transformer, "__call__", recording_step)
    a = pipe(PROMPT, width=64, height=64, seed=1)
    assert modes and set(modes) == {(True, True)} and not kernels._FUSED_ONLY.get()
    assert laid_out == [mx.float32]  # the low-memory one loaded its transformer as stored
    monkeypatch.undo()
    assert pipe._text_encoder is None and pipe._transformer is None
    b = pipe(PROMPT, width=64, height=64, seed=1)  # transformer reloads, embedding cached
    c = full(PROMPT, width=64, height=64, seed=1)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # the tiled decode of low-memory mode stays within a gray level of the untiled one
    assert np.abs(np.asarray(a.image).astype(int) - np.asarray(c.image).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"width": 100}, "width 100 is not allowed"),
        ({"height": 8192}, "height 8192 is not allowed"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"latents": np.zeros((1, 128, 2, 2), np.float32)}, "latents have shape (1, 128, 2, 2)"),
    ],
)
def test_bad_requests(prism_model, kwargs, message):
    root, _ = prism_model
    pipe = BonsaiPipeline.from_pretrained(str(root), dtype="float32")
    args = {"prompt": PROMPT, "width": 64, "height": 64, **kwargs}
    with pytest.raises(BonsaiError) as err:
        pipe(**args)
    assert message in str(err.value)


def test_converted_model_gives_the_same_image(prism_model, tmp_path):
    from mlx_bonsai.convert.converter import convert

    root, _ = prism_model
    converted = convert(str(root), tmp_path / "bonsai")
    assert (converted / "transformer-bonsai" / "bonsai.json").is_file()
    images = [
        BonsaiPipeline.from_pretrained(str(path), dtype="float32")(
            PROMPT, width=96, height=64, seed=3
        ).image
        for path in (root, converted)
    ]
    assert np.asarray(images[0]).std() > 5
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
