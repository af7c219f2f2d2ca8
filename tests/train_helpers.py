"""Shared helpers for training tests: tiny configs on the built-in synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from dem_jax.config.loader import load_run_config
from dem_jax.config.model import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"

# The tiny model of the merge-method tests (Fisher, RegMean, TaskPGM): one config,
# so one compiled initialiser and forward serve them all.
TINY_MODEL = ModelConfig(
    vocab_size=37,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
)


def tiny_config(output_dir: Path, *overrides: str):
    """configs/tiny.yaml with output_dir set and overrides applied."""
    return load_run_config(TINY, [f"output_dir={output_dir}", *overrides])


def cli_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment for a dem-jax subprocess with ``devices`` simulated CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEM_JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def dem_jax_cmd(*args) -> list[str]:
    """argv running the dem-jax CLI with this interpreter."""
    return [sys.executable, "-m", "dem_jax", *map(str, args)]


def run_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the CLI to completion, capturing output."""
    return subprocess.run(
        dem_jax_cmd(*args),
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_params(model_dir: Path) -> list[np.ndarray]:
    """Every parameter of a saved model, in a fixed order, as numpy arrays."""
    import dem_jax

    return [np.asarray(x) for x in jax.tree.leaves(dem_jax.load_model(model_dir).params)]
