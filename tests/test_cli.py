"""`dem-jax convert` end to end, and every bad input ending in exit 2 with one clear line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_models import save_hf_model, save_tokenizer
from safetensors.numpy import load_file, save_file

import dem_jax
from dem_jax import cli


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_bad_input(capsys, needle, *argv):
    code, err = run_cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def hf_dir(tmp_path):
    save_hf_model("llama_gqa", tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_convert_both_ways(capsys, hf_dir, tmp_path):
    assert run_cli(capsys, "convert", "hf-to-orbax", hf_dir, tmp_path / "o")[0] == 0
    assert (tmp_path / "o" / "dem_jax_model.json").is_file()
    code, err = run_cli(
        capsys, "convert", "orbax-to-hf", tmp_path / "o", tmp_path / "h", "--max-shard-size", "10KB"
    )
    assert code == 0, err
    assert (tmp_path / "h" / "model.safetensors.index.json").is_file()
    a, b = dem_jax.load_model(hf_dir), dem_jax.load_model(tmp_path / "h")
    tokens = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(dem_jax.forward(a, tokens), dem_jax.forward(b, tokens))


def test_entry_points_run_as_processes(hf_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    for i, cmd in enumerate([["dem-jax"], [sys.executable, "-m", "dem_jax"]]):
        out = tmp_path / f"o{i}"
        ok = subprocess.run(
            [*cmd, "convert", "hf-to-orbax", hf_dir, out], env=env, capture_output=True, text=True
        )
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run(
            [*cmd, "convert", "hf-to-orbax", tmp_path / "nope", out],
            env=env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines()[-1].startswith("dem-jax: error:")
        assert "Traceback" not in bad.stderr


def test_unknown_architecture(capsys, hf_dir, tmp_path):
    edit_config(hf_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    line = assert_bad_input(
        capsys, "GPT2LMHeadModel", "convert", "hf-to-orbax", hf_dir, tmp_path / "o"
    )
    assert "config.json" in line and "not supported" in line
    assert not (tmp_path / "o").exists()


def test_unsupported_rope_type(capsys, hf_dir, tmp_path):
    edit_config(hf_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    assert_bad_input(capsys, "'yarn'", "convert", "hf-to-orbax", hf_dir, tmp_path / "o")


def test_missing_tensor(capsys, hf_dir, tmp_path):
    edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_bad_input(
        capsys,
        "missing tensor model.layers.1.mlp.up_proj.weight",
        "convert",
        "hf-to-orbax",
        hf_dir,
        tmp_path / "o",
    )
    assert not (tmp_path / "o").exists()


def test_wrong_shape(capsys, hf_dir, tmp_path):
    def shrink(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][
            :-1
        ]

    edit_tensors(hf_dir, shrink)
    line = assert_bad_input(
        capsys,
        "model.layers.2.self_attn.k_proj.weight",
        "convert",
        "hf-to-orbax",
        hf_dir,
        tmp_path / "o",
    )
    assert "[19, 40]" in line and "[20, 40]" in line


def test_vocab_mismatch_between_config_and_embeddings(capsys, hf_dir, tmp_path):
    edit_config(hf_dir, vocab_size=128)
    line = assert_bad_input(
        capsys, "model.embed_tokens.weight", "convert", "hf-to-orbax", hf_dir, tmp_path / "o"
    )
    assert "vocab" in line and "128" in line


def test_tokenizer_larger_than_vocab(capsys, hf_dir, tmp_path):
    save_tokenizer(hf_dir, vocab_size=150)
    line = assert_bad_input(
        capsys, "tokenizer.json", "convert", "hf-to-orbax", hf_dir, tmp_path / "o"
    )
    assert "150" in line and "101" in line


def test_unexpected_tensor(capsys, hf_dir, tmp_path):
    edit_tensors(hf_dir, lambda t: t.update(extra=np.zeros(3, np.float32)))
    assert_bad_input(
        capsys, "unexpected tensor extra", "convert", "hf-to-orbax", hf_dir, tmp_path / "o"
    )


def test_truncated_safetensors(capsys, hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    assert_bad_input(capsys, "model.safetensors", "convert", "hf-to-orbax", hf_dir, tmp_path / "o")


def test_bad_config_json(capsys, hf_dir, tmp_path):
    (hf_dir / "config.json").write_text("{not json")
    assert_bad_input(
        capsys, "config.json: not valid JSON", "convert", "hf-to-orbax", hf_dir, tmp_path / "o"
    )


def test_not_a_model_directory(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_bad_input(
        capsys,
        "not a model directory",
        "convert",
        "hf-to-orbax",
        tmp_path / "empty",
        tmp_path / "o",
    )
    assert_bad_input(
        capsys, "does not exist", "convert", "hf-to-orbax", tmp_path / "missing", tmp_path / "o"
    )


def test_wrong_direction(capsys, hf_dir, tmp_path):
    assert_bad_input(
        capsys, "needs a dem-jax directory", "convert", "orbax-to-hf", hf_dir, tmp_path / "o"
    )


def test_existing_output_is_kept(capsys, hf_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_bad_input(capsys, "already exists", "convert", "hf-to-orbax", hf_dir, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_corrupt_orbax_metadata(capsys, hf_dir, tmp_path):
    assert run_cli(capsys, "convert", "hf-to-orbax", hf_dir, tmp_path / "o")[0] == 0
    meta = tmp_path / "o" / "dem_jax_model.json"
    data = json.loads(meta.read_text())
    data["model"]["num_layers"] = 5
    meta.write_text(json.dumps(data))
    assert_bad_input(capsys, "params", "convert", "orbax-to-hf", tmp_path / "o", tmp_path / "h")
    data["model"]["bogus_field"] = 1
    meta.write_text(json.dumps(data))
    assert_bad_input(
        capsys, "bogus_field", "convert", "orbax-to-hf", tmp_path / "o", tmp_path / "h"
    )


def test_bad_shard_size(capsys, hf_dir, tmp_path):
    assert run_cli(capsys, "convert", "hf-to-orbax", hf_dir, tmp_path / "o")[0] == 0
    assert_bad_input(
        capsys,
        "--max-shard-size",
        "convert",
        "orbax-to-hf",
        tmp_path / "o",
        tmp_path / "h",
        "--max-shard-size",
        "lots",
    )


def test_failure_mid_export_leaves_nothing(capsys, hf_dir, tmp_path, monkeypatch):
    """An export that dies after some shards were written leaves no output and no temp dir."""
    from dem_jax.io.hf import checkpoint as hf_checkpoint

    real = hf_checkpoint.iter_hf_tensors

    def dying(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 10:
                raise OSError("disk full")
            yield item

    monkeypatch.setattr(hf_checkpoint, "iter_hf_tensors", dying)
    model = dem_jax.load_model(hf_dir)
    with pytest.raises(OSError, match="disk full"):
        dem_jax.save_model(model, tmp_path / "h", format="hf", max_shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_version_and_help_answer_without_jax():
    """`--version` and every `--help` are argparse alone: no JAX, transformers or torch."""
    script = (
        "import sys, contextlib, io\n"
        "from dem_jax import cli\n"
        "for argv in (['--version'], ['--help'], ['merge', '--help'], ['train', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            cli.main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "    assert out.getvalue(), argv\n"
        "print(out.getvalue() and cli.version(), [m for m in ('jax', 'transformers', 'torch')"
        " if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "[]", done.stdout
    assert done.stdout.startswith(dem_jax.__version__)


@pytest.mark.parametrize(
    "method, needle",
    [(None, "merge_method: missing (one of: task_arithmetic"),
     ("task_arithmatic", "did you mean 'task_arithmetic'?")],
    ids=["missing", "misspelt"],
)  # fmt: skip
def test_merge_method_missing_or_misspelt(capsys, hf_dir, tmp_path, method, needle):
    cfg = {"models": [{"model": str(hf_dir)}], **({"merge_method": method} if method else {})}
    (tmp_path / "m.yaml").write_text(json.dumps(cfg))
    assert_bad_input(capsys, needle, "merge", tmp_path / "m.yaml", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_misspelt_config_key_suggests_the_right_one(capsys, tmp_path):
    from train_helpers import TINY

    assert_bad_input(capsys, "did you mean 'learning_rate'?", "train", TINY,
                     "--distribution", "reverse", f"output_dir={tmp_path}",
                     "train.learnig_rate=0.1")  # fmt: skip


def test_writing_weights_shows_one_progress_bar(capsys, hf_dir, tmp_path):
    assert run_cli(capsys, "convert", "hf-to-orbax", hf_dir, tmp_path / "o")[0] == 0
    code, err = run_cli(capsys, "convert", "orbax-to-hf", tmp_path / "o", tmp_path / "exported")
    assert code == 0, err
    bar = [part for part in err.replace("\r", "\n").splitlines() if "writing exported" in part]
    assert bar and "100%" in bar[-1] and "B/s" in bar[-1], err


def test_commands_keep_compiled_programs_on_disk(hf_dir, tmp_path):
    """Every command points JAX's persistent compilation cache at $DEM_JAX_CACHE/xla (a
    second run of the same shapes loads instead of compiling); DEM_JAX_COMPILE_CACHE=0
    turns it off, and a cache configured for JAX itself is left alone."""
    probe = (
        "import jax; from dem_jax.sharding.compile_cache import enable_compilation_cache as e;"
        "print(e(), jax.config.jax_compilation_cache_dir)"
    )
    # the suite's own JAX cache (conftest) is kept out of these commands' environment
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "DEM_JAX_COMP"))}

    def run(argv, **env):
        env = {**clean, "DEM_JAX_CACHE": str(tmp_path / "cache"), **env}
        done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    xla, mine, theirs = (str(tmp_path / n) for n in ("cache/xla", "mine", "jax"))
    assert run(["-c", probe]) == [xla, xla]
    assert run(["-c", probe], DEM_JAX_COMPILE_CACHE="0") == ["None", "None"]
    assert run(["-c", probe], DEM_JAX_COMPILE_CACHE=mine) == [mine, mine]
    assert run(["-c", probe], JAX_COMPILATION_CACHE_DIR=theirs) == ["None", theirs]
    # and the CLI turns it on
    run(["-m", "dem_jax", "convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "o")])
    assert (tmp_path / "cache" / "xla").is_dir()
