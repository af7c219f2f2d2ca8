"""``dem-jax demo``: what the package can do today, end to end, on a CPU.

The full DEM pipeline demo (fine-tunes, distribution vectors, weight search,
report) is not built yet. Until it is, the demo shows the foundation it
stands on: a tiny Llama-family model goes Hugging Face -> dem-jax (Orbax) ->
Hugging Face, and every tensor and the logits are checked on the way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from dem_jax.api import forward, init_model, load_model, save_model
from dem_jax.config import ModelConfig
from dem_jax.hf.safetensors_io import SafetensorsCheckpoint

DEMO_CONFIG = ModelConfig(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=160,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
)


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    with SafetensorsCheckpoint(directory) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def run_demo(out: str) -> int:
    """Run the round trip in ``out``; 0 when every check passes."""
    start = time.perf_counter()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    print("dem-jax demo: the DEM pipeline demo is not built yet; this runs the converter")
    print(f"round trip on a tiny built-in Llama model ({DEMO_CONFIG.num_params:,} params).")

    hf_dir, orbax_dir, back_dir = root / "hf", root / "orbax", root / "hf_roundtrip"
    save_model(init_model(DEMO_CONFIG, seed=0), hf_dir, format="hf", overwrite=True)
    print(f"  wrote Hugging Face model      {hf_dir}")
    save_model(load_model(hf_dir), orbax_dir, format="orbax", overwrite=True)
    print(f"  converted hf -> orbax         {orbax_dir}")
    save_model(load_model(orbax_dir), back_dir, format="hf", overwrite=True)
    print(f"  converted orbax -> hf         {back_dir}")

    before, after = _tensors(hf_dir), _tensors(back_dir)
    identical = before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes()
        for k in before
    )
    same_config = json.loads((hf_dir / "config.json").read_text()) == json.loads(
        (back_dir / "config.json").read_text()
    )
    tokens = np.random.default_rng(0).integers(0, DEMO_CONFIG.vocab_size, (2, 16))
    logits = [np.asarray(forward(load_model(d), tokens)) for d in (hf_dir, orbax_dir, back_dir)]
    max_diff = max(float(np.abs(logits[0] - x).max()) for x in logits[1:])

    print(f"  tensors bit-identical after round trip: {identical} ({len(before)} tensors)")
    print(f"  config.json identical:                  {same_config}")
    print(f"  max |logit difference| across formats:  {max_diff:.3g}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    ok = identical and same_config and max_diff == 0.0
    if not ok:
        print("dem-jax demo: FAILED", file=sys.stderr)
    return 0 if ok else 1
