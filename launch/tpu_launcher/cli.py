"""The command line: subcommands and their options, checks before anything runs, dispatch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import LaunchError
from .gcloud import Tpu
from .jobs import export_argv, merge_job, search_argv, train_jobs
from .launcher import Launcher
from .runner import DryRunner, Runner
from .settings import REMOTE_ENV_PREFIX, SETTINGS, Settings
from .worker_scripts import exec_script, install_script, setup_script, stop_script


def build_parser() -> argparse.ArgumentParser:
    """Subcommands, each with --env, --set and --dry-run."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env", metavar="FILE", help="settings file (KEY=VALUE lines)")
    common.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    common.add_argument(
        "--dry-run", action="store_true", help="print the commands, one per line; run nothing"
    )
    parser = argparse.ArgumentParser(
        prog="dem_tpu.py",
        description="DEM on Cloud TPU VMs. Settings: --env FILE (see dem-tpu.env.example).",
        epilog="settings:\n"
        + "\n".join(f"  {k:<22}{h}" for k, (_, h) in SETTINGS.items())
        + f"\n  {REMOTE_ENV_PREFIX + 'NAME':<22}export NAME on the workers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    add("create", "create the TPU VM (or queued resource) and wait until it is ready")
    add("install", "set up Python and install JAX + dem-jax on every worker; copy CONFIG")
    add("sync", "copy CONFIG and the dem-jax source again and reinstall dem-jax")
    p = add(
        "exec", "run a command in the dem-jax venv on every worker, e.g. exec -- dem-jax --help"
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    p = add("train", "train every distribution (restarting preempted slices)")
    p.add_argument("--distribution", action="append", help="only this one (repeatable)")
    p.add_argument("--parallel", action="store_true", default=None, help="one slice each")
    p.add_argument("--sequential", dest="parallel", action="store_false", help="all on TPU_NAME")
    p.add_argument("--mixture", action="store_true", default=None, help="also the mixture")
    p.add_argument("--keep", action="store_true", help="keep per-distribution slices after")
    add("search", "choose merge weights by validation perplexity; write the merged model")
    add("merge", "run the mergekit-style MERGE_CONFIG; write MERGE_OUT (Hugging Face format)")
    add("export", "convert the DEM model (MERGED_DIR) to Hugging Face format in HF_DIR")
    add("logs", "copy every worker's logs to LOG_DIR")
    add("status", "print the slice's state")
    p = add("stop", "SIGTERM a running job on every worker (train checkpoints first)")
    p.add_argument("job", help="job name, e.g. train-cot, search")
    p = add("delete", "delete TPU_NAME (and the per-distribution slices with PARALLEL)")
    p = add("pipeline", "train all, search, merge, export, fetch logs (delete if DELETE_AFTER)")
    p.add_argument("--delete", action="store_true", default=None, help="delete slices at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load(args.env, args.set)
        runner = DryRunner() if args.dry_run else Runner()
        runner.secrets = [os.environ[n] for n in settings.words("PASS_ENV") if os.environ.get(n)]
        return dispatch(Launcher(settings, runner), args)
    except LaunchError as e:
        print(f"dem_tpu.py: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. a dry run piped into `head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (nothing more to flush at exit)
        return 1
    except KeyboardInterrupt:
        print(
            "dem_tpu.py: interrupted (detached jobs keep running on the workers)", file=sys.stderr
        )
        return 130


def preflight(s: Settings, cmd: str) -> None:
    """Check every setting a command will need before it creates or runs anything."""
    tpu = Tpu(s.get("TPU_NAME"), s)
    tpu.describe()
    if cmd in ("create", "train", "search", "merge", "export", "pipeline"):
        tpu.create()
    if cmd in ("install", "sync", "train", "search", "merge", "export", "pipeline"):
        setup_script(s), install_script(s)
        if not Path(s.get("CONFIG")).is_file():
            raise LaunchError(f"CONFIG: {s.get('CONFIG')}: no such file")
    if cmd in ("exec", "train", "search", "merge", "export", "pipeline"):
        s.remote_env()
    if cmd in ("train", "pipeline") or (cmd == "delete" and s.flag("PARALLEL")):
        train_jobs(s)
    if cmd in ("export", "pipeline"):
        export_argv(s)
    if cmd == "merge" or (cmd == "pipeline" and s.get("MERGE_CONFIG")):
        merge_job(s)


def dispatch(launcher: Launcher, args: argparse.Namespace) -> int:
    """Carry out one subcommand."""
    s, tpu, cmd = launcher.settings, launcher.tpu(), args.command
    preflight(s, cmd)
    if cmd == "create":
        launcher.create(tpu)
    elif cmd == "install":
        launcher.install(tpu)
    elif cmd == "sync":
        launcher.sync(tpu)
    elif cmd == "exec":
        words = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not words:
            raise LaunchError("exec: give a command, e.g. exec -- dem-jax --help")
        return launcher.runner.run(tpu.ssh(exec_script(s, words))).returncode
    elif cmd == "train":
        return launcher.train(args.distribution, args.parallel, args.mixture, args.keep)
    elif cmd == "search":
        return launcher.babysit(tpu, "search", search_argv(s))
    elif cmd == "merge":
        if not s.get("MERGE_CONFIG"):
            raise LaunchError("merge: set MERGE_CONFIG (a mergekit-style YAML)")
        pre, argv = merge_job(s)
        return launcher.babysit(tpu, "merge", argv, pre)
    elif cmd == "export":
        return launcher.babysit(tpu, "export", export_argv(s))
    elif cmd == "logs":
        launcher.fetch_logs(tpu)
    elif cmd == "status":
        state = launcher.state(tpu)
        if not launcher.dry:  # a dry run prints commands only
            print(f"{tpu.name}: {state}")
    elif cmd == "stop":
        return launcher.runner.run(tpu.ssh(stop_script(s, args.job))).returncode
    elif cmd == "delete":
        launcher.delete_all()
    elif cmd == "pipeline":
        return launcher.pipeline(args.delete)
    return 0
