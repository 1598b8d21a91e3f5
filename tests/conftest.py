"""Shared test setup: no network, a shared cache for the tiny offline models, two threads, and
the helpers every CLI test uses (`cli`, `one_line_error`)."""

import os
import tempfile
from pathlib import Path

# No test may touch the network: a hub look-up here hangs ~45 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny diffusers pipelines built from configs are saved once here and reused by every module
# (and by the subprocesses the tests start, which inherit the environment).
os.environ.setdefault("DPSEG_CACHE", str(Path(tempfile.gettempdir()) / "dpseg-test-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_towers():
    from dpseg.clip import load_clip

    torch.manual_seed(0)
    return load_clip("tiny", weights=None)


def _runner():
    from typer.testing import CliRunner

    try:  # click < 8.2 mixes stderr into stdout unless asked not to; 8.2+ always keeps both
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args, input=None):
    """Runs `dpseg ARGS...` in-process; an exception that escapes the CLI fails the test (a user
    must never see a traceback), a clean exit of any code returns the Result."""
    from cli.main import app

    return _runner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="session")
def cli():
    """`cli("bank", "info", path, "--json")` -> click's Result (exit_code, stdout, stderr, output).
    Session-scoped so module-scoped fixtures can use it too."""
    return invoke


def assert_one_line_error(result, *fragments):
    """Exit code 1, exactly one non-empty line on stderr, starting with `Error:`, no traceback
    anywhere, and every fragment in that line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def one_line_error():
    """`one_line_error(cli("bank", "info", "nowhere"), "no bank at")`."""
    return assert_one_line_error


def bank_build_flags(generator: str = "procedural", templates: int = 3, steps: int | None = None) -> list[str]:
    """`dpseg bank build` flags for the small banks the bank tests build (tiny random tower, 32 px,
    two entries per batch and per shard, so a few categories already make several shards)."""
    flags = [
        "--generator",
        generator,
        "--encoder",
        "tiny",
        "--encoder-weights",
        "none",
        "--templates",
        str(templates),
        "--resolution",
        "32",
    ]
    if steps is not None:
        flags += ["--steps", str(steps)]
    return flags + ["--batch-size", "2", "--shard-size", "2", "--no-progress"]


def write_vocab(folder, names: list[str]):
    """A vocabulary file (one class per line) in `folder`."""
    path = Path(folder) / "names.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def tiny_run(root, names: list[str], bank: str | Path = "bank", checkpoint: str | Path = "ckpt", **extra) -> Path:
    """A tiny random dual checkpoint (2 templates, 64 px) and the procedural bank it records, under
    `root`: the stand-in for a trained run in tests whose result does not depend on training.
    `extra` adds to the checkpoint's recorded facts (dataset, recipe, ...)."""
    from bank.build import BuildSettings, build_bank
    from bank.generators.base import GeneratorSettings
    from dpseg.model import DPSegConfig, build_dpseg
    from dpseg.model.checkpoint import save_dpseg

    root = Path(root)
    vocab = root / "tiny-run-vocab.txt"
    vocab.write_text("".join(f"{n}\n" for n in names))
    build_bank(
        BuildSettings(
            out=root / bank,
            generator="procedural",
            vocab=[str(vocab)],
            encoder="tiny",
            encoder_weights=None,
            templates=2,
            encode_size=64,
            generator_options=GeneratorSettings(resolution=32),
            progress=False,
        )
    )
    torch.manual_seed(0)
    save_dpseg(
        build_dpseg(DPSegConfig(encoder="tiny", templates=2), weights=None),
        root / checkpoint,
        extra={"bank": {"path": str(root / bank)}, "encoder": "tiny", "encode_size": 64, **extra},
    )
    return root


def first_conv(tower) -> torch.nn.Conv2d:
    """The first convolution of an image tower's trunk (ConvNeXt's patchify stem, ResNet's deep stem)."""
    return next(m for m in tower.visual.trunk.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.fixture(scope="session")
def app_world(tmp_path_factory):
    """A tiny random dual checkpoint, a 2-class procedural bank and a 2-image shapes dataset the
    checkpoint records (the app's examples), plus a drawn 200x150 test picture: circle and square.
    Built in a few seconds; nothing stored."""
    from PIL import Image, ImageDraw

    from dpseg.data.synth import write_shapes_benchmark

    root = tmp_path_factory.mktemp("app")
    write_shapes_benchmark(root / "shapes", images=1, val_images=2, size=64, progress=False)
    tiny_run(root, ["red solid circle", "blue solid square"], dataset=str(root / "shapes"), recipe={"crop_size": 64})
    picture = Image.new("RGB", (200, 150), (230, 230, 230))
    draw = ImageDraw.Draw(picture)
    draw.ellipse([20, 20, 90, 90], fill=(220, 20, 20))
    draw.rectangle([110, 40, 180, 120], fill=(20, 20, 220))
    picture.save(root / "picture.png")
    return root
