"""BonsaiPipeline: prompt -> text encoder -> transformer + Euler loop -> VAE -> image.

One object holds the loaded components between calls; prompt embeddings are cached per
prompt. `low_memory=True` keeps only what the current phase needs resident: the text encoder
is dropped after encoding, the transformer before decoding, each transformer block is
computed in parts (attention, MLP), one part in flight at a time, packed layers stay as stored
(on Hopper GPUs ternary ones are otherwise held as larger digit words) and run on fused kernels
only (never decoded to dense copies), and the VAE decodes in tiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__, kernels
from .errors import BonsaiError, ConfigError
from .scheduler import SchedulerConfig, euler_loop, sigmas
from .transformer import Transformer, image_ids, load_transformer, pack_latents, text_ids
from .vae import VAE, load_vae

if TYPE_CHECKING:  # the text encoder imports mlx-lm and transformers (seconds): load on use
    from .text_encoder import TextEncoder

ALIASES = {
    "ternary": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
    "binary": "prism-ml/bonsai-image-binary-4B-mlx-1bit",
}
DEFAULT_MODEL = "ternary"

# Component folders, in order of preference, for the three layouts we read:
# ours (bonsai-packed), PrismML's MLX packs, and diffusers' dense repos.
TRANSFORMER_DIRS = ("transformer-bonsai", "transformer-packed-mflux", "transformer")
TEXT_ENCODER_DIRS = ("text_encoder-mlx-4bit", "text_encoder")
DOWNLOAD_PATTERNS = [
    *(f"{d}/*" for d in TRANSFORMER_DIRS + TEXT_ENCODER_DIRS),
    "tokenizer/*",
    "vae/*",
    "scheduler/*",
    "*.json",
]

MIN_SIDE, MAX_SIDE = 64, 4096
TRAINED_SIDES = (256, 2048)
LATENT_CHANNELS = 128  # packed 2x2 patches of the 32-channel VAE latent
PIXELS_PER_TOKEN = 16
VAE_TILE = 512  # output pixels per VAE tile in low-memory mode
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


class ModelNotFoundError(BonsaiError):
    """The model name is neither an alias, a local checkpoint, nor a reachable repo."""


class InvalidRequestError(BonsaiError):
    """A generation argument is out of range."""


@dataclass(frozen=True)
class ModelFiles:
    """Where each component of a checkpoint lives on disk."""

    root: Path
    transformer: Path
    text_encoder: Path
    tokenizer: Path
    vae: Path
    scheduler: Path

    @classmethod
    def find(cls, root: str | Path) -> ModelFiles:
        root = Path(root)

        def first(names: tuple[str, ...], what: str) -> Path:
            for name in names:
                if (root / name).is_dir():
                    return root / name
            raise ModelNotFoundError(
                f"{root} is not a Bonsai/FLUX.2 checkpoint: no {what} folder "
                f"({', '.join(n + '/' for n in names)})"
            )

        return cls(
            root=root,
            transformer=first(TRANSFORMER_DIRS, "transformer"),
            text_encoder=first(TEXT_ENCODER_DIRS, "text encoder"),
            tokenizer=first(("tokenizer",), "tokenizer"),
            vae=first(("vae",), "VAE"),
            scheduler=first(("scheduler",), "scheduler"),
        )


def resolve_model(name: str) -> Path:
    """A local directory for `name`: an alias, a Hugging Face repo id, or a local path.

    Repo ids download through huggingface_hub into its normal cache (only the files a
    pipeline needs); with HF_HUB_OFFLINE=1 an already-cached model is used without network.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    repo = ALIASES.get(name, name)
    if repo.count("/") != 1 or path.suffix or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"unknown model '{name}': use one of {', '.join(ALIASES)}, a Hugging Face repo id "
            "(org/name) or an existing local directory"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=DOWNLOAD_PATTERNS))
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelNotFoundError(f"no Hugging Face repo '{repo}' (check the name)") from None
    except Exception as e:  # offline, DNS failure, HTTP errors: all mean "not reachable"
        raise ModelNotFoundError(
            f"cannot download '{repo}' and it is not in the Hugging Face cache "
            f"({type(e).__name__}); connect to the internet once to download it, "
            "or pass a local directory with -m/--model"
        ) from None


def check_size(width: int, height: int) -> list[str]:
    """Raise on an impossible size; return warnings for sizes the model was not trained at."""
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or side % PIXELS_PER_TOKEN or not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidRequestError(
                f"{name} {side} is not allowed: use a multiple of {PIXELS_PER_TOKEN} "
                f"from {MIN_SIDE} to {MAX_SIDE}"
            )
    lo, hi = TRAINED_SIDES
    return [
        f"{name} {side} is outside {lo}..{hi}, where the model was trained; expect artifacts"
        for name, side in (("width", width), ("height", height))
        if not lo <= side <= hi
    ]


def latent_shape(height: int, width: int) -> tuple[int, int, int, int]:
    """(1, 128, H/16, W/16): the initial noise of one image."""
    return (1, LATENT_CHANNELS, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)


def initial_noise(seed: int, height: int, width: int, dtype: mx.Dtype) -> mx.array:
    """Reproducible (1, 128, H/16, W/16) Gaussian noise for `seed`."""
    return mx.random.normal(latent_shape(height, width), key=mx.random.key(seed)).astype(dtype)


def to_pil(image: mx.array) -> Image.Image:
    """(1, H, W, 3) floats in [0, 1] -> 8-bit RGB, rounding half to even like diffusers."""
    pixels = np.round(np.array(image[0].astype(mx.float32)) * 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@dataclass
class GenerationResult:
    image: Image.Image
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, object] = field(default_factory=dict)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a PNG with the generation parameters in its text chunks, atomically."""
        path = Path(path)
        if not path.parent.is_dir():
            raise InvalidRequestError(f"output directory {path.parent} does not exist")
        if path.exists() and not overwrite:
            raise InvalidRequestError(
                f"{path} exists; pass overwrite=True (--overwrite) to replace"
            )
        info = PngInfo()
        for key, value in self.parameters.items():
            info.add_text(key, str(value))
        info.add_text("parameters", json.dumps(self.parameters))
        write_atomic(path, lambda f: self.image.save(f, format="PNG", pnginfo=info))
        return path


def write_atomic(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder, then rename: no partial files."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Phase:
    """Times one phase and records MLX's peak memory during it."""

    def __init__(self, timings: dict[str, float], peaks: dict[str, int], name: str):
        self.timings, self.peaks, self.name = timings, peaks, name

    def __enter__(self) -> None:
        mx.reset_peak_memory()
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
        self.peaks[self.name] = mx.get_peak_memory()


class BonsaiPipeline:
    """Text-to-image with Bonsai Image 4B (or any FLUX.2 klein checkpoint) on MLX."""

    def __init__(self, files: ModelFiles, dtype: mx.Dtype, low_memory: bool, name: str):
        self.files = files
        self.dtype = dtype
        self.low_memory = low_memory
        self.name = name
        self.scheduler = SchedulerConfig.from_pretrained(files.scheduler)
        self._embeddings: dict[str, mx.array] = {}
        self._text_encoder: TextEncoder | None = None
        self._transformer: Transformer | None = None
        self._vae: VAE | None = None
        self.load_time = 0.0
        self.load_peak = 0

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_MODEL, dtype: str | None = None, low_memory: bool = False
    ) -> BonsaiPipeline:
        """Load a model by alias (`ternary`, `binary`), Hugging Face repo id or local path."""
        dtype = dtype or "bfloat16"
        if dtype not in DTYPES:
            raise InvalidRequestError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        files = ModelFiles.find(resolve_model(name_or_path))
        pipe = cls(files, DTYPES[dtype], low_memory, name_or_path)
        timings: dict[str, float] = {}
        peaks: dict[str, int] = {}
        with _Phase(timings, peaks, "load"):
            # The text encoder loads on first use. With low_memory every model loads when its
            # phase comes, so no two of them need be resident at once.
            if not low_memory:
                pipe._load_transformer()
                pipe._load_vae()
        pipe.load_time, pipe.load_peak = timings["load"], peaks["load"]
        return pipe

    # -- components ----------------------------------------------------------------------

    def _load_transformer(self) -> Transformer:
        if self._transformer is None:
            self._transformer = load_transformer(self.files.transformer, self.dtype,
                                                 device_layout=not self.low_memory)
            mx.eval(self._transformer.parameters())
        return self._transformer

    def _load_vae(self) -> VAE:
        if self._vae is None:
            vae = load_vae(self.files.vae, self.dtype)
            if 2 * vae.config.scale_factor != PIXELS_PER_TOKEN:
                raise ConfigError(
                    f"{self.files.vae}: this VAE makes {2 * vae.config.scale_factor} pixels per "
                    f"token; FLUX.2 needs {PIXELS_PER_TOKEN} (4 resolution levels)"
                )
            self._vae = vae
        return self._vae

    def _load_text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            from .text_encoder import TextEncoder

            self._text_encoder = TextEncoder.from_pretrained(
                self.files.text_encoder, self.files.tokenizer, dtype=self.dtype
            )
        return self._text_encoder

    def _release(self, attribute: str) -> None:
        setattr(self, attribute, None)
        mx.clear_cache()

    # -- phases --------------------------------------------------------------------------

    def encode(self, prompt: str) -> mx.array:
        """Prompt embeddings (1, 512, 3 * hidden), cached per prompt."""
        if prompt not in self._embeddings:
            embedding = self._load_text_encoder()(prompt).astype(self.dtype)
            mx.eval(embedding)
            self._embeddings[prompt] = embedding
            if self.low_memory:
                self._release("_text_encoder")
        return self._embeddings[prompt]

    def denoise(
        self,
        embedding: mx.array,
        noise: mx.array,
        steps: int,
        progress: Callable[[int], None] | None = None,
    ) -> mx.array:
        """Run the Euler loop from noise (1, 128, h, w); returns the final latents as tokens
        (1, h*w, 128), row-major."""
        model = self._load_transformer()
        _, _, h, w = noise.shape
        rope = model.rope(text_ids(embedding.shape[1]), image_ids(h, w))
        schedule = sigmas(self.scheduler, steps, h * w)
        x = pack_latents(noise.astype(self.dtype))
        # Low memory: packed layers never decode to dense copies (kernels.fused_only).
        with kernels.fused_only() if self.low_memory else contextlib.nullcontext():
            return euler_loop(
                lambda x, t: model(x, embedding, t, rope, evaluate_blocks=self.low_memory),
                x,
                schedule,
                progress,
            )

    def decode(self, tokens: mx.array, height: int, width: int) -> mx.array:
        """Latent tokens (1, h*w, 128) -> image (1, 16h, 16w, 3) in [0, 1]."""
        vae = self._load_vae()
        # Tokens are row-major with channels last: already the VAE's NHWC packed latents.
        latents = tokens.reshape(1, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN, -1)
        image = vae.decode(latents, tile_size=VAE_TILE if self.low_memory else None)
        mx.eval(image)
        return image

    def __call__(
        self,
        prompt: str,
        width: int = 512,
        height: int = 512,
        steps: int = 4,
        seed: int | None = None,
        latents: mx.array | np.ndarray | None = None,
        progress: Callable[[int], None] | None = None,
        last: bool = True,
    ) -> GenerationResult:
        """Generate one image. `latents` (1, 128, H/16, W/16) replaces the seeded noise;
        `last=False` tells a low-memory pipeline that another image follows (keep the
        transformer resident)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("the prompt is empty: give a text prompt")
        check_size(width, height)
        if not isinstance(steps, int) or steps < 1:
            raise InvalidRequestError(f"steps must be a positive integer, got {steps!r}")
        seed = secrets.randbits(31) if seed is None else int(seed)
        shape = latent_shape(height, width)
        if latents is None:
            noise = initial_noise(seed, height, width, self.dtype)
        else:
            noise = mx.array(latents)
            if tuple(noise.shape) != shape:
                raise InvalidRequestError(
                    f"latents have shape {tuple(noise.shape)}; {width}x{height} needs {shape}"
                )

        timings: dict[str, float] = {"load": self.load_time}
        peaks: dict[str, int] = {"load": self.load_peak}
        self.load_time, self.load_peak = 0.0, 0  # reported once, with the first image
        with _Phase(timings, peaks, "encode"):
            embedding = self.encode(prompt)
        with _Phase(timings, peaks, "denoise"):
            out = self.denoise(embedding, noise, steps, progress)
        if self.low_memory and last:
            self._release("_transformer")
        with _Phase(timings, peaks, "decode"):
            image = self.decode(out, height, width)
        parameters = {
            "prompt": prompt,
            "seed": seed,
            "width": width,
            "height": height,
            "steps": steps,
            "model": self.name,
            "software": f"mlx_bonsai {__version__}",
        }
        return GenerationResult(to_pil(image), seed, timings, peaks, parameters)
