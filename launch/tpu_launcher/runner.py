"""Running commands here: for real (`Runner`), or printing them for a dry run (`DryRunner`)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .errors import LaunchError


@dataclass
class Result:
    """What a command returned."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner:
    """Runs commands for real; progress goes to stderr, command output passes through."""

    dry = False

    def __init__(self):
        self._lock = threading.Lock()
        self.secrets: list[str] = []  # PASS_ENV values, masked in the progress log

    def log(self, message: str) -> None:
        with self._lock:
            print(f"dem-tpu: {message}", file=sys.stderr, flush=True)

    def run(self, argv: list[str], capture: bool = False) -> Result:
        """Run ``argv``; with ``capture`` return its output instead of showing it."""
        if not capture:
            self.log("+ " + self.mask(shlex.join(argv)))
        try:
            p = subprocess.run(argv, capture_output=capture, text=True, check=False)
        except FileNotFoundError:
            raise LaunchError(f"{argv[0]}: command not found") from None
        return Result(p.returncode, p.stdout or "", p.stderr or "")

    def mask(self, line: str) -> str:
        """``line`` with every secret replaced by ***, at any depth of single-quoting."""
        for secret in self.secrets:
            forms = [secret]
            for _ in range(4):  # each shlex.quote level turns ' into '"'"'
                forms.append(forms[-1].replace("'", "'\"'\"'"))
            for form in sorted(set(forms), key=len, reverse=True):
                line = line.replace(form, "***")
        return line

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DryRunner(Runner):
    """Prints each command on stdout instead of running it.

    ``describe`` answers NOT_FOUND for a slice until its ``create`` was
    printed, then READY (ACTIVE for a queued resource), so the printed sequence
    is that of a fresh start.
    """

    dry = True

    def __init__(self, out=None):
        super().__init__()
        self.out = out or sys.stdout
        self.created: set[str] = set()

    def run(self, argv: list[str], capture: bool = False) -> Result:
        with self._lock:
            print(shlex.join(argv), file=self.out, flush=True)
        if argv[:3] != ["gcloud", "compute", "tpus"] or len(argv) < 6:
            return Result(0)
        verb, name = argv[4], argv[5]
        if verb == "create":
            self.created.add(name)
        elif verb == "delete":
            self.created.discard(name)
        elif verb == "describe":
            if name not in self.created:
                return Result(1, "", f"ERROR: NOT_FOUND: {name} was not found")
            queued = argv[3] == "queued-resources"
            state = {"state": "ACTIVE"} if queued else "READY"
            return Result(0, json.dumps({"state": state}))
        return Result(0)

    def sleep(self, seconds: float) -> None:
        pass
