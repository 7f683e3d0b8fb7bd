# %% [markdown]
# # Bonsai Image 4B in a notebook
# Cells are marked `# %%` (VS Code, Jupytext). The pipeline stays loaded between cells, and the
# prompt embedding is computed once per prompt.

# %%
from mlx_bonsai import BonsaiPipeline

pipe = BonsaiPipeline.from_pretrained("ternary")  # or "binary", a repo id, a local directory

# %% One image; the result carries the image, the seed, timings and peak memory per phase.
result = pipe("a lighthouse on a cliff at dusk, oil painting", width=512, height=512, seed=1)
print(result.timings)
print({phase: f"{peak / 1e9:.2f} GB" for phase, peak in result.peak_memory.items()})
result.image  # noqa: B018 -- a PIL image, displayed inline by Jupyter

# %% Same prompt, other seeds: no text encoding, no reload.
images = [pipe("a lighthouse on a cliff at dusk, oil painting", seed=s).image for s in (2, 3, 4)]

# %% Start from your own noise (1, 128, H/16, W/16), e.g. to compare runtimes on equal inputs.
import mlx.core as mx  # noqa: E402

noise = mx.random.normal((1, 128, 32, 32), key=mx.random.key(0))
same = pipe("a lighthouse on a cliff at dusk, oil painting", latents=noise)
