"""launch/dem_tpu.py: nothing a user types (a job name, a setting) runs as shell code on
the workers. Unsafe job names and settings are refused with one line and exit status 2
before anything runs; the worker scripts quote every value even when a check is skipped,
which is verified by running them in bash against a fake worker home."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))  # the script's package
from tpu_launcher import worker_scripts
from tpu_launcher.cli import main
from tpu_launcher.errors import LaunchError
from tpu_launcher.gcloud import one_line
from tpu_launcher.settings import Settings

# Each would run `touch` on the worker if it reached a shell unquoted.
EVIL = ['x";touch pwned;"', "$(touch pwned)", "`touch pwned`", "x'; touch pwned; '"]

needs_gnu = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("bash", "setsid", "tail", "stat")) or sys.platform != "linux",
    reason="the worker scripts need bash and GNU coreutils (Linux TPU VMs have them)",
)


@pytest.fixture
def env_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\n")
    path = tmp_path / "tpu.env"
    path.write_text(
        "PROJECT=p\nZONE=us-central2-b\nTPU_NAME=dem-test\nACCELERATOR_TYPE=v4-8\n"
        f"CONFIG={config}\nDISTRIBUTIONS=cot\nOUTPUT_DIR=gs://b/run\n"
        "DEM_JAX_SOURCE=git+https://example.com/dem-jax.git\nPOLL_SECONDS=0\n"
    )
    return path


@pytest.fixture
def worker(tmp_path):
    """A fake worker home: REMOTE_DIR (dem-jax) with a venv whose dem-jax exits at once."""
    home = tmp_path / "home"
    (home / "dem-jax" / "venv" / "bin").mkdir(parents=True)
    fake = home / "dem-jax" / "venv" / "bin" / "dem-jax"
    fake.write_text('#!/bin/bash\nprintf "ARG<%s>\\n" "$@"\n')
    fake.chmod(0o755)
    return home


def launch(capsys, *argv):
    """(exit status, stdout lines, stderr) of the launcher run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def refused(capsys, *argv) -> str:
    """The one error line of a command that must be refused before anything runs."""
    code, out, err = launch(capsys, *argv)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dem_tpu.py: error:"), err
    assert "Traceback" not in err and out == []  # nothing printed, so nothing ran
    return lines[0]


def run_script(home: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=home, capture_output=True, text=True, timeout=60
    )


def remote_script(argv: list[str]) -> str:
    """The bash script of a `gcloud ... ssh --command=bash -c SCRIPT` argv."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    words = shlex.split(command)
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    return words[2]


def pwned(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith("pwned")]


@pytest.mark.parametrize("job", [*EVIL, "a b", "../x", "-rf", ".hidden", "", "x" * 64])
def test_stop_refuses_unsafe_job_names(capsys, env_file, tmp_path, job):
    line = refused(capsys, "stop", "--env", env_file, "--dry-run", "--", job)
    assert "job name" in line and repr(job) in line
    assert pwned(tmp_path) == []


def test_good_job_names_pass():
    for job in ("train-cot", "search", "train_mixture.v2", "A1", "x" * 63):
        assert worker_scripts.check_job_name(job) == job
    s = Settings({})
    with pytest.raises(LaunchError, match="job name"):
        worker_scripts.job_script(s, "x;y", ["dem-jax", "--help"])


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("REMOTE_DIR=$(touch pwned)", "setting REMOTE_DIR"),
        ("REMOTE_DIR=dem jax", "setting REMOTE_DIR"),
        ("REMOTE_DIR=a;touch pwned", "setting REMOTE_DIR"),
        ("TPU_NAME=evil:host", "setting TPU_NAME"),
        ("TPU_NAME=Bad Name", "setting TPU_NAME"),
        ("PASS_ENV=X;touch", "PASS_ENV: 'X;touch' is not a variable name"),
    ],
)
def test_unsafe_settings_are_refused(capsys, env_file, tmp_path, setting, needle):
    line = refused(capsys, "exec", "--env", env_file, "--dry-run", "--set", setting, "--", "ls")
    assert needle in line, line
    assert pwned(tmp_path) == []


def test_unsafe_wheel_file_name_is_refused(capsys, env_file, tmp_path):
    wheel = tmp_path / "x$(touch pwned).whl"
    wheel.write_text("")
    source = f"DEM_JAX_SOURCE={wheel}"
    line = refused(capsys, "install", "--env", env_file, "--dry-run", "--set", source)
    assert "DEM_JAX_SOURCE" in line and pwned(tmp_path) == []


@needs_gnu
def test_stop_script_quotes_a_name_that_skipped_the_check(monkeypatch, worker):
    monkeypatch.setattr(worker_scripts, "check_job_name", lambda job: job)
    s = Settings({})
    for job in EVIL:
        p = run_script(worker, one_line(worker_scripts.stop_script(s, job)))
        assert p.returncode == 0, p.stderr
        assert f"dem-tpu: {job} is not running" in p.stdout, p.stdout
    assert pwned(worker.parent) == []


@needs_gnu
def test_job_script_quotes_a_name_that_skipped_the_check(monkeypatch, worker):
    monkeypatch.setattr(worker_scripts, "check_job_name", lambda job: job)
    s = Settings({})
    job = EVIL[0] + EVIL[1]
    script = one_line(worker_scripts.job_script(s, job, ["dem-jax", "train", "$(touch pwned)"]))
    p = run_script(worker, script)
    assert p.returncode == 0, p.stderr
    assert "ARG<$(touch pwned)>" in p.stdout  # the argument arrived verbatim
    (host,) = (worker / "dem-jax" / "logs").iterdir()
    assert (host / f"{job}.rc").read_text().strip() == "0"  # files named by the literal name
    assert pwned(worker.parent) == []


@needs_gnu
def test_a_trailing_keyword_word_does_not_join_lines(capsys, env_file, worker):
    # `then`/`do`/`else` ending a command's arguments must not glue the next line on.
    assert one_line(["set -- a x=then", "echo z"]) == "set -- a x=then; echo z"
    assert one_line(["if true; then", "echo do", "else", "echo b", "fi"]) == (
        "if true; then echo do; else echo b; fi"
    )
    code, out, err = launch(capsys, "exec", "--env", env_file, "--dry-run", "--", "echo", "do")
    assert code == 0, err
    p = run_script(worker, remote_script(shlex.split(out[-1])))
    assert p.returncode == 0 and p.stdout.strip() == "do", (p.stdout, p.stderr)
    s = Settings({"TRAIN_OVERRIDES": "x=then"})
    argv = ["dem-jax", "train", "config.yaml", *s.words("TRAIN_OVERRIDES")]
    p = run_script(worker, one_line(worker_scripts.job_script(s, "train-cot", argv)))
    assert p.returncode == 0, p.stderr
    assert "ARG<x=then>" in p.stdout and "ARG<echo>" not in p.stdout


def test_values_reach_the_worker_quoted(capsys, env_file, tmp_path):
    """A REMOTE_ENV_ value and a command's words with shell syntax arrive as data."""
    evil = "$(touch pwned); `touch pwned` \"' x"
    home = tmp_path / "home"
    (home / "dem-jax").mkdir(parents=True)
    for command in (["printenv", "EVIL"], ["echo", evil]):
        flags = ["--env", env_file, "--dry-run", "--set", f"REMOTE_ENV_EVIL={evil}"]
        code, out, err = launch(capsys, "exec", *flags, "--", *command)
        assert code == 0, err
        p = run_script(home, remote_script(shlex.split(out[-1])))
        assert p.returncode == 0 and p.stdout == evil + "\n", (p.stdout, p.stderr)
    assert pwned(tmp_path) == []
