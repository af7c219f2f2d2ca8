"""DEM on Cloud TPU VMs: the package behind ``launch/dem_tpu.py`` (run that script).

* ``errors``: `LaunchError` (bad settings, a failed step) and `StepFailed`.
* ``settings``: the known settings, env file parsing, `Settings` (typed access).
* ``runner``: running commands (`Runner`) or printing them (`DryRunner`); `Result`.
* ``gcloud``: `Tpu`, the gcloud commands for one slice; its states and what to do in each.
* ``worker_scripts``: the bash scripts run on every worker (setup, install, jobs, stop).
* ``jobs``: the dem-jax command line of each job (train, search, merge, export).
* ``launcher``: `Launcher`, the commands carried out on slices, and the restart loop.
* ``cli``: argparse subcommands, preflight checks and ``main``.

Each module imports only modules listed above it. Standard library only (Python 3.9+).
"""
