"""A TPU slice in gcloud's terms.

The gcloud commands that act on a slice (pure: settings in, argv out), and what a
``describe`` answer says: the slice's state, and what the restart loop does in it.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from .errors import LaunchError
from .runner import Result
from .settings import Settings


def one_line(lines: list[str]) -> str:
    """Shell lines as one line (so each printed command is one line): joined by
    ``; ``, or by a space after a line that opens a block or a pipe (``if ...; then``,
    ``else``, ``for/while ...; do``, a trailing ``&``, ``&&``, ``||``, ``|`` or ``{``).
    A word such as ``then`` at the end of a command's arguments opens nothing."""
    out, previous = "", ""
    for line in (x.strip() for x in lines):
        if not line:
            continue
        out = f"{out}{' ' if _opens(previous) else '; '}{line}" if out else line
        previous = line
    return out


def _opens(line: str) -> bool:
    """Whether the next line continues ``line`` rather than following it."""
    if line in ("then", "else", "do") or line.endswith(("&", "|", "{")):
        return True
    return bool(re.match(r"(if|elif|while|until|for)\s.*;\s*(then|do)$", line))


@dataclass(frozen=True)
class Tpu:
    """One TPU slice (a TPU VM, or a queued resource holding one) and its gcloud commands."""

    name: str
    settings: Settings = field(repr=False, compare=False)

    @property
    def queued(self) -> bool:
        return self.settings.flag("QUEUED")

    @property
    def queued_resource(self) -> str:
        """The queued resource's id (its node is ``name``)."""
        return f"{self.name}-qr"

    def _where(self) -> list[str]:
        s = self.settings
        return [f"--zone={s.get('ZONE')}", f"--project={s.get('PROJECT')}"]

    def create(self) -> list[str]:
        """Create the slice (or queue the request for it)."""
        s = self.settings
        spot, preemptible = s.flag("SPOT"), s.flag("PREEMPTIBLE")
        if spot and preemptible:
            raise LaunchError("SPOT and PREEMPTIBLE: choose one")
        accel = f"--accelerator-type={s.get('ACCELERATOR_TYPE')}"
        if self.queued:
            if preemptible:
                raise LaunchError("queued resources take SPOT=true, not PREEMPTIBLE")
            argv = ["gcloud", "compute", "tpus", "queued-resources", "create"]
            argv += [self.queued_resource, f"--node-id={self.name}", *self._where(), accel]
            argv += [f"--runtime-version={s.runtime_version()}"]
            if s.get("VALID_UNTIL_DURATION"):
                argv.append(f"--valid-until-duration={s.get('VALID_UNTIL_DURATION')}")
        else:
            if s.get("VALID_UNTIL_DURATION"):
                raise LaunchError("VALID_UNTIL_DURATION needs QUEUED=true")
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where()]
            argv += [accel, f"--version={s.runtime_version()}"]
            argv += ["--preemptible"] if preemptible else []
        argv += ["--spot"] if spot else []
        return [*argv, *s.words("CREATE_FLAGS"), "--quiet"]

    def describe(self) -> list[str]:
        """Print the slice's (or its queued resource's) state as JSON."""
        if self.queued:
            argv = ["gcloud", "compute", "tpus", "queued-resources", "describe"]
            argv.append(self.queued_resource)
        else:
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name]
        return [*argv, *self._where(), "--format=json"]

    def delete(self) -> list[str]:
        """Delete the slice (a queued resource together with its node)."""
        if self.queued:
            argv = ["gcloud", "compute", "tpus", "queued-resources", "delete"]
            return [*argv, self.queued_resource, *self._where(), "--force", "--quiet"]
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name]
        return [*argv, *self._where(), "--quiet"]

    def ssh(self, script: list[str]) -> list[str]:
        """Run bash script lines on every worker at once."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where()]
        command = f"bash -c {shlex.quote(one_line(script))}"
        return [*argv, "--worker=all", f"--command={command}", "--quiet"]

    def scp_to(self, local: str, remote: str) -> list[str]:
        """Copy a local file to ``remote`` (relative to the home directory) on every worker."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}"]
        return [*argv, *self._where(), "--worker=all", "--quiet"]

    def scp_from(self, remote: str, local: str) -> list[str]:
        """Copy a remote directory from every worker to ``local``."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
        argv += [f"{self.name}:{remote}", local]
        return [*argv, *self._where(), "--worker=all", "--quiet"]


# Slice states, as `describe` reports them (plus the two this launcher adds).
NOT_FOUND, UNREACHABLE = "NOT_FOUND", "UNREACHABLE"
READY_STATES = {"READY", "ACTIVE"}
# Gone for good: delete and create again (preempted Spot VM; a queued resource
# whose Spot node was reclaimed is SUSPENDING/SUSPENDED; FAILED requests).
LOST_STATES = {"PREEMPTED", "TERMINATED", "SUSPENDING", "SUSPENDED", "FAILED", "STOPPED"}
LOST_STATES |= {"STOPPING", "HIDING", "HIDDEN", "UNKNOWN"}


def parse_state(result: Result, queued: bool) -> str:
    """The state in a ``describe --format=json`` result; NOT_FOUND when there is no
    such slice, UNREACHABLE when gcloud failed otherwise."""
    if result.returncode != 0:
        text = result.stderr.lower()
        return NOT_FOUND if "not_found" in text or "not found" in text else UNREACHABLE
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        return UNREACHABLE
    state = data.get("state")
    if queued and isinstance(state, dict):
        state = state.get("state")
    return state if isinstance(state, str) and state else UNREACHABLE


def next_action(state: str) -> str:
    """What the restart loop does in a state: create, recreate (delete it first),
    run, or wait (creating, queued, deleting, or gcloud unreachable)."""
    if state == NOT_FOUND:
        return "create"
    if state in READY_STATES:
        return "run"
    if state in LOST_STATES:
        return "recreate"
    return "wait"
