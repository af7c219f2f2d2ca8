#!/usr/bin/env python3
"""DEM on Cloud TPU VMs: from nothing to a trained, merged, exported model.

    launch/dem_tpu.py pipeline --env my-tpu.env             # everything, in order
    launch/dem_tpu.py train --env my-tpu.env --dry-run      # print the gcloud commands only

Every setting comes from one env file (see launch/dem-tpu.env.example), never
from edits to this script. Every command takes ``--env FILE``, ``--set
KEY=VALUE`` (repeatable, wins over the file) and ``--dry-run`` (print the exact
commands, one per line, shell-quoted, and run nothing).

Commands run on every worker of the slice at once (``--worker=all``): one
process per host, as ``jax.distributed.initialize()`` expects. Long jobs
(train, search, merge, export) start detached on the workers (``setsid
nohup``), log to ``REMOTE_DIR/logs/HOST/JOB.log`` and are followed over ssh;
a dropped connection does not stop them, and running the same job again
re-attaches instead of starting a second copy.

Spot and preemptible slices are babysat: the slice's state is polled; when it is
PREEMPTED / SUSPENDED (or otherwise gone) it is deleted and created again,
dem-jax is reinstalled and the same command runs again, resuming from its
latest checkpoint in output_dir.

Needs only Python 3.9+ and the gcloud CLI on this machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)  # the package lives next to this script
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from tpu_launcher.cli import main  # noqa: E402 (needs HERE on sys.path)

if __name__ == "__main__":
    sys.exit(main())
