"""Generate one image with BonsaiPipeline and print where the time and memory went.

    python examples/generate.py "a bonsai tree on a wooden desk" --model binary --seed 42
"""

import argparse

from mlx_bonsai import BonsaiPipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("--model", default="ternary")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--low-memory", action="store_true")
    args = parser.parse_args()

    pipe = BonsaiPipeline.from_pretrained(args.model, low_memory=args.low_memory)
    result = pipe(args.prompt, width=args.size, height=args.size, seed=args.seed)
    path = result.save(f"example_{result.seed}.png", overwrite=True)
    print(f"saved {path}")
    for phase, seconds in result.timings.items():
        print(f"{phase:8s} {seconds:6.2f} s   peak {result.peak_memory[phase] / 1e9:5.2f} GB")


if __name__ == "__main__":
    main()
