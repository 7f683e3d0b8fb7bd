"""Command line: python -m mlx_bonsai.generate -p "a bonsai tree on a desk" --seed 42"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from tqdm import tqdm

from . import __version__
from .errors import BonsaiError
from .pipeline import (
    DEFAULT_MODEL,
    DTYPES,
    BonsaiPipeline,
    GenerationResult,
    check_size,
    write_atomic,
)


class UsageError(BonsaiError):
    pass


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise UsageError("give exactly one of -p/--prompt and --prompt-file")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {prompt_file}: {e}") from None
    if not prompt.strip():
        raise UsageError("the prompt is empty: give a text prompt")
    return prompt.strip()


def _output_paths(template: str | None, seeds: list[int], overwrite: bool) -> list[Path]:
    """One path per seed; refuse to overwrite unless asked, number the default name instead."""
    explicit = template is not None
    template = template or "bonsai_{seed}.png"
    if len(seeds) > 1 and "{seed}" not in template:
        raise UsageError("several seeds need '{seed}' in --output, e.g. out_{seed}.png")
    paths = []
    for seed in seeds:
        path = Path(template.replace("{seed}", str(seed))).expanduser()
        if path.suffix.lower() != ".png":
            raise UsageError(f"--output {path} must end in .png")
        if not path.parent.is_dir():
            raise UsageError(f"output directory {path.parent} does not exist")
        if path.exists() or path in paths:
            if explicit and not overwrite:
                raise UsageError(f"{path} exists; pass --overwrite to replace it")
            if not explicit:
                n = 1
                while path.with_name(f"{path.stem}-{n}{path.suffix}").exists():
                    n += 1
                path = path.with_name(f"{path.stem}-{n}{path.suffix}")
        paths.append(path)
    return paths


def _memory_table(result: GenerationResult) -> str:
    lines = [f"{'phase':<8} {'time (s)':>9} {'peak memory (GB)':>17}"]
    for phase, seconds in result.timings.items():
        peak = result.peak_memory.get(phase, 0) / 1e9
        lines.append(f"{phase:<8} {seconds:>9.2f} {peak:>17.2f}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--prompt", help="Text prompt.")
@click.option(
    "--prompt-file", type=click.Path(path_type=Path), help="Read the prompt from a text file."
)
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="'ternary', 'binary', a Hugging Face repo id, or a local directory.",
)
@click.option("--seed", type=int, multiple=True, help="Seed; repeat for several images.")
@click.option("--steps", type=int, default=4, show_default=True, help="Denoising steps.")
@click.option("--width", type=int, default=512, show_default=True, help="Multiple of 16.")
@click.option("--height", type=int, default=512, show_default=True, help="Multiple of 16.")
@click.option("--output", help="PNG path; '{seed}' is replaced by the seed.  [bonsai_{seed}.png]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bfloat16", show_default=True)
@click.option("--low-memory", is_flag=True, help="Keep only the current phase's model resident.")
@click.option("--profile-memory", is_flag=True, help="Print time and peak memory per phase.")
@click.option("--metadata", is_flag=True, help="Write a JSON sidecar next to each image.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.version_option(__version__, prog_name="mlx_bonsai")
def main(**options) -> None:
    """Generate images with Bonsai Image 4B on MLX."""
    try:
        run(**options)
    except BonsaiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def run(
    *,
    prompt: str | None,
    prompt_file: Path | None,
    model: str,
    seed: tuple[int, ...],
    steps: int,
    width: int,
    height: int,
    output: str | None,
    overwrite: bool,
    dtype: str,
    low_memory: bool,
    profile_memory: bool,
    metadata: bool,
    quiet: bool,
) -> None:
    """The command's work; every bad input raises a BonsaiError that `main` prints."""
    seeds = list(seed)
    prompt = _read_prompt(prompt, prompt_file)
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    for warning in check_size(width, height):
        if not quiet:
            click.echo(f"warning: {warning}", err=True)
    if not seeds:
        seeds = [int.from_bytes(os.urandom(4), "little") >> 1]
    paths = _output_paths(output, seeds, overwrite)
    for path in paths if metadata else []:
        if path.with_suffix(".json").exists() and not overwrite:
            raise UsageError(f"{path.with_suffix('.json')} exists; pass --overwrite to replace it")

    say = (lambda *a, **k: None) if quiet else click.echo
    say(f"Loading {model} ...")
    pipe = BonsaiPipeline.from_pretrained(model, dtype=dtype, low_memory=low_memory)
    for i, (seed, path) in enumerate(zip(seeds, paths, strict=True)):
        with tqdm(total=steps, desc=f"seed {seed}", unit="step", leave=False, disable=quiet) as bar:
            result = pipe(
                prompt,
                width=width,
                height=height,
                steps=steps,
                seed=seed,
                progress=lambda _, bar=bar: bar.update(),
                last=i == len(seeds) - 1,
            )
        result.save(path, overwrite=overwrite)
        if metadata:
            sidecar = {**result.parameters, "timings": result.timings, "version": __version__}
            text = json.dumps(sidecar, indent=2).encode()
            write_atomic(path.with_suffix(".json"), lambda f, text=text: f.write(text))
        total = sum(result.timings.values())
        say(f"Saved {path} ({width}x{height}, seed {seed}, {steps} steps) in {total:.1f} s")
        if profile_memory:
            click.echo(_memory_table(result))


if __name__ == "__main__":
    main()
