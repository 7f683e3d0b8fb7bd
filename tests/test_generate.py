"""The command line, run as users run it: python -m mlx_bonsai.generate in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_packs import TINY_CONFIG, write_prism_transformer

from mlx_bonsai import BonsaiPipeline
from mlx_bonsai.generate import UsageError, _output_paths


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    write_prism_transformer(root, TINY_CONFIG, "ternary", seed=11)
    return root


def cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_bonsai.generate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def assert_one_line_error(result, message):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0]


def test_generates_png_with_metadata(model, tmp_path):
    out = tmp_path / "img_{seed}.png"
    result = cli(
        "-p",
        "a red fox",
        "-m",
        str(model),
        "--seed",
        "42",
        "--width",
        "96",
        "--height",
        "64",
        "--output",
        str(out),
        "--metadata",
        "--profile-memory",
    )
    assert result.returncode == 0, result.stderr
    png = tmp_path / "img_42.png"
    image = Image.open(png)
    assert image.size == (96, 64)
    assert image.text["prompt"] == "a red fox" and image.text["seed"] == "42"
    assert json.loads(image.text["parameters"])["steps"] == 4
    sidecar = json.loads((tmp_path / "img_42.json").read_text())
    assert sidecar["seed"] == 42 and set(sidecar["timings"]) == {
        "load",
        "encode",
        "denoise",
        "decode",
    }
    assert f"Saved {png}" in result.stdout
    assert "peak memory (GB)" in result.stdout and "denoise" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] != []  # no temporary files left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # The same seed in another process (the Python API) gives the same bytes.
    again = BonsaiPipeline.from_pretrained(str(model))("a red fox", width=96, height=64, seed=42)
    again.parameters["model"] = str(model)
    assert again.save(tmp_path / "api.png").read_bytes() == png.read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "100"], "width 100 is not allowed"),
        (["--height", "8192"], "height 8192 is not allowed"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["-p", "  "], "the prompt is empty"),
        (["-m", "turnary"], "unknown model 'turnary'"),
        (["--output", "/nonexistent-dir/x.png"], "output directory /nonexistent-dir does not"),
        (["--output", "x.jpg"], "must end in .png"),
    ],
)
def test_bad_arguments(model, tmp_path, args, message):
    base = {"-p": "a fox", "-m": str(model)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = cli(*[x for kv in base.items() for x in kv], cwd=tmp_path)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("-p", "a fox", "-m", str(tmp_path / "empty"), cwd=tmp_path)
    assert_one_line_error(result, "is not a Bonsai/FLUX.2 checkpoint: no transformer folder")


def test_existing_output_needs_overwrite(model, tmp_path):
    (tmp_path / "taken.png").write_bytes(b"keep me")
    result = cli("-p", "a fox", "-m", str(model), "--output", str(tmp_path / "taken.png"))
    assert_one_line_error(result, "taken.png exists; pass --overwrite")
    assert (tmp_path / "taken.png").read_bytes() == b"keep me"


def test_existing_sidecar_needs_overwrite(model, tmp_path):
    (tmp_path / "x.json").write_text("{}")
    result = cli("-p", "a fox", "-m", str(model), "--output", str(tmp_path / "x.png"), "--metadata")
    assert_one_line_error(result, "x.json exists; pass --overwrite")
    assert not (tmp_path / "x.png").exists()


def test_truncated_weights_are_named(model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "transformer-packed-mflux" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli("-p", "a fox", "-m", str(broken), "--output", str(tmp_path / "o.png"))
    assert_one_line_error(result, "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "o.png").exists()


def test_quantization_config_must_match(model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    qconfig = broken / "transformer-packed-mflux" / "quantization_config.json"
    qconfig.write_text(json.dumps({**json.loads(qconfig.read_text()), "bits": 1}))
    result = cli("-p", "a fox", "-m", str(broken), "--output", str(tmp_path / "o.png"))
    assert_one_line_error(result, "the quantization config says bits=1")


def test_offline_without_cache(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = cli("-p", "a fox", "-m", "binary", cwd=tmp_path, env=env)
    assert_one_line_error(result, "cannot download 'prism-ml/bonsai-image-binary-4B-mlx-1bit'")
    assert "connect to the internet once" in result.stderr


def test_default_names_count_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bonsai_42.png").write_bytes(b"")
    Path("bonsai_42-1.png").write_bytes(b"")
    assert _output_paths(None, [42, 7], overwrite=False) == [
        Path("bonsai_42-2.png"),
        Path("bonsai_7.png"),
    ]
    with pytest.raises(UsageError, match="several seeds need"):
        _output_paths("one.png", [1, 2], overwrite=False)
