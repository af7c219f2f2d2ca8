"""launch/dem_tpu.py: every command's --dry-run output (real gcloud syntax, quoting that
survives, all workers, zone/project, spot, env pass-through, one job per distribution),
the remote job scripts executed here against a fake dem-jax, and the restart loop
driven through scripted `describe` answers."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))  # the script's package
from tpu_launcher.errors import LaunchError
from tpu_launcher.gcloud import next_action, parse_state
from tpu_launcher.launcher import Launcher
from tpu_launcher.runner import Result, Runner
from tpu_launcher.settings import RUNTIME_VERSIONS, Settings, read_env_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "dem_tpu.py"
EXAMPLE = ROOT / "launch" / "dem-tpu.env.example"

COMMANDS = [
    "create",
    "install",
    "sync",
    "exec",
    "train",
    "search",
    "merge",
    "export",
    "logs",
    "status",
    "stop",
    "delete",
    "pipeline",
]
TRICKY = """it's "quoted" $HOME `x` ; rm -rf /"""  # must reach the worker verbatim


@pytest.fixture
def env_file(tmp_path):
    """Settings with awkward values: a config path with a space, quotes everywhere."""
    config = tmp_path / "my configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("output_dir: out\n")
    merge = tmp_path / "merge.yaml"
    merge.write_text("merge_method: task_arithmetic\n")
    path = tmp_path / "tpu.env"
    path.write_text(
        f"""# a comment
PROJECT=my-proj
export ZONE=us-central2-b   # trailing comment
TPU_NAME=dem-test
ACCELERATOR_TYPE=v4-32
SPOT=true
BUCKET=gs://bkt
CONFIG={shlex.quote(str(config))}
OUTPUT_DIR=${{BUCKET}}/dem/run1
DISTRIBUTIONS="cot p3 super_natural"
TRAIN_OVERRIDES={shlex.quote("train.steps=7 " + shlex.quote("data.prompt_template=" + TRICKY))}
MERGE_CONFIG={shlex.quote(str(merge))}
DEM_JAX_SOURCE="git+https://github.com/example/dem-jax.git@v1"
PASS_ENV="HF_TOKEN"
REMOTE_ENV_TRICKY={shlex.quote(TRICKY)}
REMOTE_ENV_XLA_FLAGS="--xla_a=1 --xla_b=2"
POLL_SECONDS=0
"""
    )
    return path


def launch(*args, env_file=None, extra_env=None, check=True):
    """Run the script; (exit status, stdout lines, stderr)."""
    args = [str(a) for a in args]
    if env_file is not None:  # right after the command: `exec` takes the rest as its command
        args[1:1] = ["--env", str(env_file)]
    argv = [sys.executable, str(SCRIPT), *args]
    env = {**os.environ, "HF_TOKEN": "hf secret 'x'", **(extra_env or {})}
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p.returncode, p.stdout.splitlines(), p.stderr


def dry(command, env_file, *args):
    """The commands a dry run prints, each split back into its argv."""
    _, lines, _ = launch(command, "--dry-run", *args, env_file=env_file)
    return [shlex.split(line) for line in lines]


def remote_script(argv):
    """The bash script of a `gcloud ... ssh --command=bash -c SCRIPT` argv."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    words = shlex.split(command)
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    return words[2]


def script_commands(script):
    """The simple commands of a one-line script, each as its words."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    commands, current = [], []
    for token in lex:
        if token in (";", "&", "&&", "||", "|"):
            commands, current = [*commands, current] if current else commands, []
        else:
            current.append(token)
    return [*commands, current] if current else commands


def job_argv(script):
    """The dem-jax argv a job script runs (its `set -- ...` line)."""
    (argv,) = [c[2:] for c in script_commands(script) if c[:2] == ["set", "--"]]
    return argv


def ssh_scripts(commands):
    return [remote_script(c) for c in commands if c[4:5] == ["ssh"]]


# --------------------------------------------------------------------------
# --help and --dry-run of every command
# --------------------------------------------------------------------------


def test_help_everywhere():
    _, lines, _ = launch("--help")
    assert all(c in "\n".join(lines) for c in COMMANDS) and "DEM_JAX_SOURCE" in "\n".join(lines)
    for command in COMMANDS:
        _, lines, _ = launch(command, "--help")
        text = "\n".join(lines)
        assert "--dry-run" in text and "--env" in text, command


@pytest.mark.parametrize("command", COMMANDS)
def test_dry_run_prints_well_formed_commands(command, env_file, tmp_path):
    # Record anything the dry run would execute: nothing may run.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("gcloud", "tar", "ssh", "scp"):
        (fake_bin / tool).write_text(f"#!/bin/sh\necho {tool} >>{tmp_path}/ran\n")
        (fake_bin / tool).chmod(0o755)
    args = {"exec": ["--", "python", "-c", "print(1)"], "stop": ["train-cot"]}.get(command, [])
    path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    _, lines, _ = launch(command, "--dry-run", *args, env_file=env_file, extra_env={"PATH": path})
    assert not (tmp_path / "ran").exists()
    assert lines, command
    for line in lines:
        argv = shlex.split(line)
        assert shlex.join(argv) == line  # one command per line, canonically quoted
        assert argv[0] in ("gcloud", "tar")
        if argv[0] != "gcloud":
            continue
        assert argv[:3] == ["gcloud", "compute", "tpus"] and argv[3] in (
            "tpu-vm",
            "queued-resources",
        )
        assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv
        if argv[4] in ("ssh", "scp"):
            assert "--worker=all" in argv


def test_real_run_against_a_fake_gcloud(env_file, tmp_path):
    """Not a dry run: gcloud (faked) is really called, its answers are used, and
    PASS_ENV values stay out of the progress log."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.jsonl"
    (fake_bin / "gcloud").write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'describe' in sys.argv: print(json.dumps({'state': 'READY'}))\n"
    )
    (fake_bin / "gcloud").chmod(0o755)
    path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    _, out, _ = launch("status", env_file=env_file, extra_env={"PATH": path})
    assert out == ["dem-test: READY"]
    _, out, err = launch(
        "train", "--distribution", "p3", env_file=env_file, extra_env={"PATH": path}
    )
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    verbs = [a[3] for a in argvs]
    assert verbs == ["describe", "describe", "ssh", "scp", "scp", "ssh", "ssh"]  # no create
    assert "--worker=all" in argvs[-1] and "train-p3" in argvs[-1][-2]
    assert "hf secret" not in err and "***" in err and "train-p3 done" in err


def test_dry_run_needs_no_gcloud_and_fails_cleanly_on_bad_settings(env_file, tmp_path):
    code, _, err = launch(
        "train", "--dry-run", env_file=env_file, extra_env={"PATH": "/nonexistent"}
    )
    assert code == 0, err
    bad = tmp_path / "bad.env"
    bad.write_text("PROJECT=p\nZONEE=typo\n")
    code, _, err = launch("status", "--dry-run", env_file=bad, check=False)
    assert code == 2 and "ZONEE" in err and "Traceback" not in err
    bad.write_text("PROJECT=p\n")
    code, _, err = launch("status", "--dry-run", env_file=bad, check=False)
    assert code == 2 and "setting TPU_NAME is required" in err
    bad.write_text("PROJECT=my project\n")
    code, _, err = launch("status", "--dry-run", env_file=bad, check=False)
    assert code == 2 and "bad.env:1" in err


def test_shipped_example_settings_work():
    values = read_env_file(EXAMPLE, environ={})
    assert (ROOT / values["CONFIG"]).is_file()
    _, lines, _ = launch("pipeline", "--dry-run", env_file=EXAMPLE)
    assert any("--distribution" in line for line in lines)


def test_env_file_syntax(tmp_path):
    path = tmp_path / "x.env"
    path.write_text(
        "# c\nexport PROJECT='a b'  # c\nZONE=z\nBUCKET=gs://b\nOUTPUT_DIR=${BUCKET}/o\n"
        "REMOTE_ENV_A=\"x=1 'y'\"\n"
    )
    values = read_env_file(path, environ={})
    assert values == {
        "PROJECT": "a b",
        "ZONE": "z",
        "BUCKET": "gs://b",
        "OUTPUT_DIR": "gs://b/o",
        "REMOTE_ENV_A": "x=1 'y'",
    }
    path.write_text("OUTPUT_DIR=${NOPE}/o\n")
    with pytest.raises(LaunchError, match="NOPE"):
        read_env_file(path, environ={})
    s = Settings.load(None, ["SPOT=maybe"])
    with pytest.raises(LaunchError, match="SPOT"):
        s.flag("SPOT")


# --------------------------------------------------------------------------
# What the commands say
# --------------------------------------------------------------------------


def test_create_flags(env_file):
    (describe, create, _) = dry("create", env_file)
    assert describe[3:6] == ["tpu-vm", "describe", "dem-test"] and "--format=json" in describe
    assert create[3:6] == ["tpu-vm", "create", "dem-test"]
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
    assert "--spot" in create and "--preemptible" not in create

    create = dry("create", env_file, "--set", "SPOT=false")[1]
    assert "--spot" not in create
    create = dry("create", env_file, "--set", "SPOT=false", "--set", "PREEMPTIBLE=true")[1]
    assert "--preemptible" in create
    create = dry("create", env_file, "--set", "ACCELERATOR_TYPE=v5litepod-16")[1]
    assert "--version=v2-alpha-tpuv5-lite" in create

    queued = ["--set", "QUEUED=true", "--set", "VALID_UNTIL_DURATION=6h"]
    describe, create, _ = dry("create", env_file, *queued)
    assert describe[3:6] == ["queued-resources", "describe", "dem-test-qr"]
    assert create[3:6] == ["queued-resources", "create", "dem-test-qr"]
    for flag in ("--node-id=dem-test", "--runtime-version=tpu-ubuntu2204-base", "--spot"):
        assert flag in create
    assert "--valid-until-duration=6h" in create
    (delete,) = dry("delete", env_file, *queued)
    assert delete[3:6] == ["queued-resources", "delete", "dem-test-qr"] and "--force" in delete

    for bad in (
        ["--set", "PREEMPTIBLE=true"],
        ["--set", "QUEUED=true", "--set", "SPOT=false", "--set", "PREEMPTIBLE=true"],
    ):
        code, _, err = launch("create", "--dry-run", *bad, env_file=env_file, check=False)
        assert code == 2 and "PREEMPTIBLE" in err


def test_runtime_versions_match_the_planner():
    from dem_jax.plan.tpu import TPU_GENERATIONS

    planner = {g.name: g.runtime_version for g in TPU_GENERATIONS.values()}
    assert planner == RUNTIME_VERSIONS


def test_sequential_training_covers_every_distribution(env_file):
    commands = dry("train", env_file)
    assert sum(c[4] == "create" for c in commands) == 1  # one slice, created once
    jobs = [s for s in ssh_scripts(commands) if "setsid" in s]
    assert len(jobs) == 3
    names, jobs_named = ["cot", "p3", "super_natural"], ["cot", "p3", "super-natural"]
    for script, name, job in zip(jobs, names, jobs_named, strict=True):
        assert f"logs/$host/train-{job}.pid" in script
        assert job_argv(script) == [
            "dem-jax",
            "train",
            "config.yaml",
            "--distribution",
            name,
            "output_dir=gs://bkt/dem/run1",
            "train.steps=7",
            "data.prompt_template=" + TRICKY,
        ]
    # The install step ran once, before the first job; the config went to every worker.
    scp = [c for c in commands if c[4] == "scp"]
    assert scp[0][5].endswith("my configs/run.yaml") and scp[0][6] == "dem-test:dem-jax/config.yaml"


def test_parallel_training_one_slice_per_distribution(env_file):
    commands = dry("train", env_file, "--parallel", "--mixture")
    created = [c[5] for c in commands if c[4] == "create"]
    deleted = [c[5] for c in commands if c[4] == "delete"]
    names = ["dem-test-cot", "dem-test-p3", "dem-test-super-natural", "dem-test-mixture"]
    assert created == names and deleted == names
    fetched = [c for c in commands if c[4] == "scp" and "--recurse" in c]
    assert len(fetched) == 4
    mixture = [s for s in ssh_scripts(commands) if "train-mixture" in s and "setsid" in s]
    assert len(mixture) == 1 and "--mixture" in mixture[0]


def test_pipeline_order(env_file):
    commands = dry("pipeline", env_file, "--delete")
    jobs = []
    for script in ssh_scripts(commands):
        if "setsid" in script:
            jobs.append(job_argv(script)[1])
    assert jobs == ["train"] * 3 + ["search", "merge", "convert"]
    export = next(s for s in ssh_scripts(commands) if "convert orbax-to-hf" in s)
    assert "gs://bkt/dem/run1/models/dem gs://bkt/dem/run1/models/dem-hf" in export
    merge_copy = [c for c in commands if c[4] == "scp" and c[6] == "dem-test:dem-jax/merge.yaml"]
    assert len(merge_copy) == 1
    merge = next(job_argv(s) for s in ssh_scripts(commands) if "dem-jax merge" in s)
    assert merge == [
        "dem-jax",
        "merge",
        "merge.yaml",
        "--out",
        "gs://bkt/dem/run1/models/merge-hf",
        "--format",
        "hf",
        "--mesh",
        "fsdp=-1",
        "--overwrite",
    ]
    assert commands[-1][4] == "delete" and commands[-2][4] == "scp"  # logs, then delete


def test_env_passes_through(env_file):
    script = next(s for s in ssh_scripts(dry("train", env_file)) if "setsid" in s)
    exports = dict(
        word.split("=", 1) for c in script_commands(script) if c[0] == "export" for word in c[1:]
    )
    assert exports["TRICKY"] == TRICKY
    assert exports["XLA_FLAGS"] == "--xla_a=1 --xla_b=2"
    assert exports["HF_TOKEN"] == "hf secret 'x'"
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "train", "--dry-run", "--env", str(env_file)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and "HF_TOKEN is not set" in p.stderr
    assert not p.stdout  # found before anything was created


def test_install_sources(env_file, tmp_path):
    install = ssh_scripts(dry("install", env_file))[-1]
    assert "uv pip install --python venv/bin/python 'jax[tpu]' " in install
    assert install.split("; ")[-2].endswith("git+https://github.com/example/dem-jax.git@v1")

    wheel = tmp_path / "dem_jax-0.1.0-py3-none-any.whl"
    wheel.write_text("")
    commands = dry("install", env_file, "--set", f"DEM_JAX_SOURCE={wheel}")
    assert [str(wheel), "dem-test:dem-jax/dist/" + wheel.name] == [
        c[5:7] for c in commands if c[4] == "scp"
    ][-1]
    assert f"dist/{wheel.name}" in ssh_scripts(commands)[-1]

    commands = dry("sync", env_file, "--set", f"DEM_JAX_SOURCE={ROOT}")
    tar = next(c for c in commands if c[0] == "tar")
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(ROOT), "."]
    assert "--exclude=.git" in tar
    assert "--reinstall-package dem-jax" in ssh_scripts(commands)[-1]
    assert "tar -xzf dist/dem-jax-src.tar.gz -C src" in ssh_scripts(commands)[-1]
    # The packing command works and leaves the repository's history out.
    archive = tmp_path / "src.tar.gz"
    subprocess.run([*tar[:2], str(archive), *tar[3:]], check=True)
    names = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True).stdout
    assert "./pyproject.toml" in names.split() and "./dem_jax/plan/__init__.py" in names.split()
    assert "/.git/" not in names and "__pycache__" not in names


# --------------------------------------------------------------------------
# The remote scripts, run here against a fake dem-jax
# --------------------------------------------------------------------------

needs_gnu = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("bash", "setsid", "tail", "stat")) or sys.platform != "linux",
    reason="the worker scripts need bash and GNU coreutils (Linux TPU VMs have them)",
)


@pytest.fixture
def worker(tmp_path):
    """A fake worker home: REMOTE_DIR with a venv whose dem-jax prints its argv."""
    home = tmp_path / "home"
    (home / "dem-jax" / "venv" / "bin").mkdir(parents=True)
    fake = home / "dem-jax" / "venv" / "bin" / "dem-jax"
    fake.write_text(
        "#!/bin/bash\n"
        'printf "ARG<%s>\\n" "$@"\n'
        'echo "TRICKY<$TRICKY>"\n'
        'echo "HF_TOKEN<$HF_TOKEN>"\n'
        'sleep "${FAKE_SLEEP:-0}"\n'
        'exit "${FAKE_RC:-0}"\n'
    )
    fake.chmod(0o755)
    return home


def job_command(env_file, *settings):
    """The ssh command that runs `train --distribution cot` (last of a dry run)."""
    sets = [a for kv in settings for a in ("--set", kv)]
    return dry("train", env_file, "--distribution", "cot", *sets)[-1]


def wait_for_start(home, job, timeout=20.0):
    """Until the fake dem-jax of ``job`` has started on the fake worker."""
    deadline = time.monotonic() + timeout
    logs = home / "dem-jax" / "logs"
    while not any("ARG<train>" in p.read_text() for p in logs.glob(f"*/{job}.log")):
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)


def run_on_worker(home, argv, env=None):
    script = remote_script(argv)
    return subprocess.Popen(
        ["bash", "-c", script],
        cwd=home,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@needs_gnu
def test_job_script_runs_detached_and_reports_status(env_file, worker):
    job = job_command(env_file, "REMOTE_ENV_FAKE_RC=3")
    p = run_on_worker(worker, job)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 3, err
    args = [line[4:-1] for line in out.splitlines() if line.startswith("ARG<")]
    assert args == [
        "train",
        "config.yaml",
        "--distribution",
        "cot",
        "output_dir=gs://bkt/dem/run1",
        "train.steps=7",
        "data.prompt_template=" + TRICKY,
    ]
    assert f"TRICKY<{TRICKY}>" in out and "HF_TOKEN<hf secret 'x'>" in out
    (host_dir,) = (worker / "dem-jax" / "logs").iterdir()
    assert (host_dir / "train-cot.rc").read_text().strip() == "3"
    assert "ARG<cot>" in (host_dir / "train-cot.log").read_text()


@needs_gnu
def test_job_script_reattaches_instead_of_starting_twice(env_file, worker):
    job = job_command(env_file, "REMOTE_ENV_FAKE_SLEEP=2")
    first = run_on_worker(worker, job)
    wait_for_start(worker, "train-cot")
    second = run_on_worker(worker, job)  # e.g. after the ssh connection dropped
    out2, _ = second.communicate(timeout=30)
    first.communicate(timeout=30)
    assert first.returncode == 0 and second.returncode == 0
    assert "already running" in out2
    log = next((worker / "dem-jax" / "logs").iterdir()) / "train-cot.log"
    assert log.read_text().count("ARG<train>") == 1  # one run, followed twice


@needs_gnu
def test_stop_script_sends_sigterm(env_file, worker):
    job = job_command(env_file, "REMOTE_ENV_FAKE_SLEEP=30")
    running = run_on_worker(worker, job)
    wait_for_start(worker, "train-cot")
    (stop,) = dry("stop", env_file, "train-cot")
    stopper = run_on_worker(worker, stop)
    assert "sent SIGTERM" in stopper.communicate(timeout=30)[0]
    running.communicate(timeout=30)
    assert running.returncode == 143  # bash reports the TERM'd dem-jax as 128 + 15


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_scripts_pass_shellcheck(env_file):
    commands = []
    runs = [
        ("pipeline", []),
        ("sync", []),
        ("stop", ["train-cot"]),
        ("install", ["--set", "INSTALLER=pip"]),
        ("exec", ["--", "ls"]),
    ]
    for command, args in runs:
        commands += dry(command, env_file, *args)
    for script in set(ssh_scripts(commands)):
        # SC2016: the single-quoted '"$@"' is meant for the detached bash, not this one.
        p = subprocess.run(
            ["shellcheck", "-s", "bash", "-e", "SC2016", "-"],
            input="#!/bin/bash\n" + script + "\n",
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stdout


# --------------------------------------------------------------------------
# The restart loop
# --------------------------------------------------------------------------


def vm(state):
    return Result(0, json.dumps({"name": "n", "state": state, "health": "HEALTHY"}))


def qr(state):
    return Result(0, json.dumps({"name": "q", "state": {"state": state}}))


MISSING = Result(1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: x")


def test_parse_state_and_next_action():
    parse = parse_state
    assert parse(vm("READY"), queued=False) == "READY"
    assert parse(qr("SUSPENDED"), queued=True) == "SUSPENDED"
    assert parse(MISSING, queued=False) == "NOT_FOUND"
    assert parse(Result(1, "", "ERROR: network is unreachable"), False) == "UNREACHABLE"
    assert parse(Result(0, "not json"), False) == "UNREACHABLE"
    table = {
        "NOT_FOUND": "create",
        "READY": "run",
        "ACTIVE": "run",
        "PREEMPTED": "recreate",
        "TERMINATED": "recreate",
        "SUSPENDING": "recreate",
        "SUSPENDED": "recreate",
        "FAILED": "recreate",
        "CREATING": "wait",
        "WAITING_FOR_RESOURCES": "wait",
        "PROVISIONING": "wait",
        "ACCEPTED": "wait",
        "DELETING": "wait",
        "REPAIRING": "wait",
        "UNREACHABLE": "wait",
    }
    assert {s: next_action(s) for s in table} == table


class ScriptedRunner(Runner):
    """Answers `describe` from a script of states and job runs from a script of exit
    statuses; records what was done."""

    dry = True  # local files (CONFIG) need not exist

    def __init__(self, states, job_codes, queued=False):
        super().__init__()
        self.states, self.job_codes, self.queued, self.events = (
            list(states),
            list(job_codes),
            queued,
            [],
        )

    def log(self, message):
        pass

    def run(self, argv, capture=False):
        verb = argv[4]
        if verb == "describe":
            state = self.states.pop(0)
            self.events.append(f"describe:{state}")
            if state == "NOT_FOUND":
                return MISSING
            return qr(state) if self.queued else vm(state)
        if verb == "ssh":
            script = remote_script(argv)
            if "setsid" in script:
                code = self.job_codes.pop(0)
                self.events.append(f"job:{code}")
                return Result(code)
            self.events.append("install")
            return Result(0)
        self.events.append(verb)  # create, delete, scp
        return Result(0)

    def sleep(self, seconds):
        self.events.append("sleep")


def babysit(states, job_codes, **settings):
    values = {
        "PROJECT": "p",
        "ZONE": "z",
        "TPU_NAME": "t",
        "ACCELERATOR_TYPE": "v4-8",
        "CONFIG": "run.yaml",
        "DISTRIBUTIONS": "cot",
        "DEM_JAX_SOURCE": "git+https://x/d.git",
        "SPOT": "true",
        "POLL_SECONDS": "0",
        **settings,
    }
    s = Settings(values)
    runner = ScriptedRunner(states, job_codes, queued=s.flag("QUEUED"))
    launcher = Launcher(s, runner)
    code = launcher.babysit(launcher.tpu(), "train-cot", ["dem-jax", "train", "x"])
    assert not runner.states and not runner.job_codes, "script not used up"
    return code, [e for e in runner.events if e not in ("scp",)]


def test_restart_loop_recreates_a_preempted_spot_vm():
    code, events = babysit(
        [
            "NOT_FOUND",
            "CREATING",
            "READY",
            "PREEMPTED",
            "PREEMPTED",
            "DELETING",
            "NOT_FOUND",
            "READY",
        ],
        [255, 0],
    )
    assert code == 0
    assert events == [
        "describe:NOT_FOUND",
        "create",
        "describe:CREATING",
        "sleep",
        "describe:READY",
        "install",
        "install",
        "job:255",  # setup + install, then the job
        "sleep",
        "describe:PREEMPTED",  # job lost: the slice is gone
        "describe:PREEMPTED",
        "delete",
        "describe:DELETING",
        "sleep",
        "describe:NOT_FOUND",
        "create",
        "describe:READY",
        "install",
        "install",
        "job:0",  # a fresh VM: reinstall, same job
    ]


def test_restart_loop_with_a_suspended_queued_resource():
    code, events = babysit(
        [
            "ACCEPTED",
            "WAITING_FOR_RESOURCES",
            "ACTIVE",
            "SUSPENDING",
            "SUSPENDED",
            "NOT_FOUND",
            "ACTIVE",
        ],
        [143, 0],
        QUEUED="true",
    )
    assert code == 0
    assert events.count("create") == 1 and events.count("delete") == 1
    assert events.count("job:143") == 1 and events[-1] == "job:0"


def test_create_waits_for_a_queued_request_and_refuses_a_lost_slice():
    runner = ScriptedRunner(["NOT_FOUND", "ACCEPTED", "PROVISIONING", "ACTIVE"], [], queued=True)
    s = Settings(
        {
            "PROJECT": "p",
            "ZONE": "z",
            "TPU_NAME": "t",
            "ACCELERATOR_TYPE": "v5p-32",
            "QUEUED": "true",
            "SPOT": "true",
        }
    )
    launcher = Launcher(s, runner)
    launcher.create(launcher.tpu())
    assert runner.events == [
        "describe:NOT_FOUND",
        "create",
        "describe:ACCEPTED",
        "sleep",
        "describe:PROVISIONING",
        "sleep",
        "describe:ACTIVE",
    ]
    runner.states = ["SUSPENDED"]
    with pytest.raises(LaunchError, match="SUSPENDED"):
        launcher.create(launcher.tpu())


def test_restart_loop_gives_up_where_retrying_cannot_help():
    # Bad input (exit status 2): no retry at all.
    code, events = babysit(["READY"], [2])
    assert code == 2 and events.count("job:2") == 1
    # Stopped on purpose (SIGTERM, slice healthy): not restarted.
    code, events = babysit(["READY", "READY"], [143])
    assert code == 143
    # A crash on a healthy slice: MAX_FAILURES re-runs, then stop.
    code, events = babysit(["READY"] * 6, [1, 1, 1], MAX_FAILURES="2")
    assert code == 1 and events.count("install") == 2  # installed once, run three times
    # Capacity never comes back: MAX_RESTARTS re-creations, then stop.
    code, events = babysit(["NOT_FOUND"] * 3, [], MAX_RESTARTS="1")
    assert code == 1 and events.count("create") == 2
