"""Nothing a user owns is ever lost: every writing command refuses an output that is,
contains or lies inside an input, replaces only dem-jax's own kind of output, lets
one writer at a time write one path, and recovers an interrupted --overwrite.

Each case runs the real command in-process (``cli.main``) and checks both the one-line
error (exit 2) and that every input file is byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hf_models import save_hf_model
from train_helpers import ROOT, TINY, TINY_MODEL

from dem_jax import cli
from dem_jax.io import outputs
from dem_jax.io.modeldir import model_format


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with a hash of its bytes (what must not change)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def bad(capsys, needle: str, *argv) -> str:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two fine-tunes (Hugging Face) and a task-arithmetic MERGE.yaml beside them."""
    root = tmp_path_factory.mktemp("family")
    for i, name in enumerate(["base", "ft_a", "ft_b"]):
        save_hf_model("llama_gqa", root / "models" / name, seed=i)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "models/base",
        "models": [
            {"model": "models/ft_a", "parameters": {"weight": 0.5}},
            {"model": "models/ft_b", "parameters": {"weight": 0.5}},
        ],
    }
    (root / "merge.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize(
    "out",
    ["models/base", "models", ".", "models/ft_a/sub", "merge.yaml"],
    ids=["equals-base", "parent-of-inputs", "parent-of-yaml", "inside-input", "equals-yaml"],
)
def test_merge_out_overlapping_an_input_is_refused(capsys, family, out):
    before = snapshot(family)
    bad(capsys, "writing there could destroy an input", "merge", family / "merge.yaml",
        "--out", family / out, "--overwrite")  # fmt: skip
    assert snapshot(family) == before


def test_overlap_is_seen_through_a_symlink(capsys, family, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(family / "models" / "base")
    before = snapshot(family)
    bad(capsys, "is the base model", "merge", family / "merge.yaml", "--out", link, "--overwrite")
    assert snapshot(family) == before


@pytest.mark.parametrize(
    "dst", ["same", "parent", "inside"], ids=["dst-is-src", "dst-parent", "dst-inside"]
)
def test_convert_onto_its_source_is_refused(capsys, family, tmp_path, dst):
    src = tmp_path / "hf"
    shutil.copytree(family / "models" / "base", src)
    target = {"same": src, "parent": tmp_path, "inside": src / "out"}[dst]
    before = snapshot(src)
    bad(capsys, "source model", "convert", "hf-to-orbax", src, target, "--overwrite")
    assert snapshot(src) == before


def test_vectors_out_overlapping_an_input_is_refused(capsys, family):
    before = snapshot(family)
    bad(capsys, "the base model", "vectors", "--base", family / "models" / "base",
        "--model", f"a={family / 'models' / 'ft_a'}", "--out", family / "models")  # fmt: skip
    assert snapshot(family) == before


def test_overwrite_of_a_user_folder_is_refused(capsys, family, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work\n")
    before = snapshot(mine)
    bad(capsys, "not a dem-jax output", "merge", family / "merge.yaml", "--out", mine,
        "--overwrite")  # fmt: skip
    bad(capsys, "not a dem-jax output", "convert", "hf-to-orbax", family / "models" / "base",
        mine, "--overwrite")  # fmt: skip
    # A lone config.json (no weights beside it) is not a model either.
    (mine / "config.json").write_text("{}")
    bad(capsys, "not a dem-jax output", "merge", family / "merge.yaml", "--out", mine,
        "--overwrite")  # fmt: skip
    assert snapshot(mine) == {**before, **snapshot(mine / "config.json")}


def test_overwrite_of_a_plain_file_is_refused_and_leaves_nothing(capsys, family, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    bad(capsys, "is a file", "merge", family / "merge.yaml", "--out", target, "--overwrite")
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_an_earlier_output_and_leaves_no_hidden_copies(capsys, family, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["merge", str(family / "merge.yaml"), "--out", str(out)]) == 0
    assert cli.main(["merge", str(family / "merge.yaml"), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_second_writer_of_the_same_output_exits_cleanly(capsys, family, tmp_path):
    """Another process holds the output's lock (as a running merge does): this one exits 2
    and neither the other's output nor its temporary directory is touched."""
    out = tmp_path / "merged"
    theirs = tmp_path / f".{out.name}.tmp-theirs"
    theirs.mkdir()
    (theirs / "part").write_text("in progress")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(tmp_path / ".merged.lock")!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        bad(capsys, "another dem-jax process is writing", "merge", family / "merge.yaml",
            "--out", out)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert (theirs / "part").read_text() == "in progress" and not out.exists()


def test_failed_vectors_run_leaves_no_empty_out(capsys, family, tmp_path):
    out = tmp_path / "vectors"
    bad(capsys, "does not exist", "vectors", "--base", family / "models" / "base",
        "--model", f"a={tmp_path / 'missing'}", "--out", out)  # fmt: skip
    assert not out.exists()


def test_demo_refuses_a_folder_that_is_not_a_demo(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("my: settings\n")
    bad(capsys, "not a dem-jax demo output", "demo", "--out", tmp_path)
    assert (tmp_path / "config.yaml").read_text() == "my: settings\n"


def test_run_whose_output_dir_holds_its_data_is_refused(capsys, tmp_path):
    """output_dir/logs would receive training logs next to the training file."""
    data = tmp_path / "run" / "logs"
    shutil.copytree(ROOT / "configs" / "tiny", data)
    before = snapshot(data)
    for cmd in (["train", TINY, "--distribution", "reverse"], ["search", TINY],
                ["mixture", TINY], ["pipeline", TINY]):  # fmt: skip
        bad(capsys, "training file", *cmd, f"output_dir={tmp_path / 'run'}",
            f"data.distributions.reverse.train={data / 'reverse.train.jsonl'}")  # fmt: skip
    assert snapshot(data) == before


def test_run_output_dir_inside_the_base_model_is_refused(capsys, family):
    before = snapshot(family)
    bad(capsys, "lies inside the base model", "train", TINY, "--distribution", "reverse",
        f"output_dir={family / 'models' / 'base' / 'run'}", "model.init=null",
        f"model.path={family / 'models' / 'base'}")  # fmt: skip
    assert snapshot(family) == before


# Recovery of an interrupted --overwrite: the process is SIGKILLed at each point of
# the swap, then the next write of the same path must finish or undo it, say which,
# and leave no hidden copy behind.

KILLER = """
import os, signal, sys
from pathlib import Path
from dem_jax.io import outputs
from dem_jax.io.modeldir import model_format

dst, point = Path(sys.argv[1]), sys.argv[2]
real_replace, real_rmtree, moves = os.replace, outputs.shutil.rmtree, []

def replace(a, b):  # the swap's directory renames (file renames write the journal)
    if Path(a).is_dir():
        moves.append(a)
        if point == "before-first-rename" and len(moves) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "between-renames" and len(moves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(a, b)

def rmtree(p, *a, **k):
    if point == "during-delete" and ".old-" in str(p):
        next(iter(Path(p).iterdir())).unlink()  # half deleted
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(p, *a, **k)

outputs.os.replace, outputs.shutil.rmtree = replace, rmtree
with outputs.atomic_directory(dst, overwrite=True) as tmp:
    (tmp / "dem_jax_model.json").write_text("new")
    (tmp / "weights").write_text("new weights")
"""


def old_model(dst: Path) -> None:
    dst.mkdir()
    (dst / "dem_jax_model.json").write_text("old")
    (dst / "weights").write_text("old weights")


@pytest.mark.parametrize(
    "point, expect, said",
    [
        ("before-first-rename", "new", "finished an interrupted --overwrite"),
        ("between-renames", "new", "finished an interrupted --overwrite"),
        ("during-delete", "new", None),
    ],
)
def test_killed_overwrite_is_recovered_by_the_next_write(capfd, tmp_path, point, expect, said):
    dst = tmp_path / "model"
    old_model(dst)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(dst), point], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden, "the kill should have left the swap half done"
    capfd.readouterr()
    # What the next write of the same output does first (under its lock), and what a
    # read of the path does when the path is missing.
    if dst.exists():
        outputs.recover(dst)
    else:
        assert model_format(dst) == "orbax"
    err = capfd.readouterr().err
    assert (dst / "dem_jax_model.json").read_text() == expect
    if said:
        assert said in err
    with outputs.atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "dem_jax_model.json").write_text("newest")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_kill_before_the_new_output_is_complete_restores_the_old(capfd, tmp_path):
    """Only the old copy is left (the new one was never journaled as complete)."""
    dst = tmp_path / "model"
    old_model(dst)
    os.replace(dst, tmp_path / ".model.old-12345678")
    (tmp_path / ".model.tmp-87654321").mkdir()  # a partial new output, never complete
    outputs.recover(dst)
    err = capfd.readouterr().err
    assert (dst / "dem_jax_model.json").read_text() == "old"
    assert "restored the previous output" in err and "removed .model.tmp-87654321" in err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_api_save_into_a_missing_folder_is_one_error(tmp_path):
    """The Python API refuses an output whose parent does not exist as the CLI does
    (a DemError naming it), creating nothing, instead of a FileNotFoundError from the
    lock file."""
    import dem_jax
    from dem_jax.errors import DemError

    model = dem_jax.init_model(TINY_MODEL)
    for fmt in ("hf", "orbax"):
        with pytest.raises(DemError, match="parent directory does not exist"):
            dem_jax.save_model(model, tmp_path / "missing" / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []
