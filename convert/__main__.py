"""Command line: python -m mlx_bonsai.convert SOURCE OUTPUT [options]."""

from __future__ import annotations

import click

from mlx_bonsai.errors import BonsaiError
from mlx_bonsai.packing import SCALE_DTYPES

from .converter import VARIANTS, convert


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--variant", type=click.Choice(VARIANTS),
              help="Packed format. Required for a dense source; a PrismML pack fixes it.")
@click.option("--dense-dtype", type=click.Choice(SCALE_DTYPES), default="bfloat16",
              show_default=True,
              help="dtype of the unpacked tensors (and of the scales, for a dense source).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
def main(source: str, output: str, variant: str | None, dense_dtype: str,
         overwrite: bool) -> None:
    """Convert SOURCE (a PrismML MLX pack or a dense diffusers FLUX.2 klein directory, or a
    Hugging Face repo id of one) into a bonsai-packed model directory OUTPUT."""
    try:
        path = convert(source, output, variant=variant, dense_dtype=dense_dtype,
                       overwrite=overwrite)
    except (BonsaiError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
