"""Where a run keeps its outputs, under ``RunConfig.output_dir``.

Every stage reads and writes through these paths so stages can be re-run,
skipped when complete, or run by hand in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dem_jax.io import storage

MIXTURE = "mixture"  # name of the data-mixing baseline's training run


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's outputs; ``root`` is a local path or a URL (``gs://...``)."""

    root: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", storage.path(self.root))

    @property
    def base_model(self) -> Any:
        """The base model, when the run initialises (or pretrains) it itself."""
        return self.root / "models" / "base"

    def model(self, name: str) -> Any:
        """Final fine-tuned model directory of one distribution (or MIXTURE)."""
        return self.root / "models" / name

    def checkpoints(self, name: str) -> Any:
        """Orbax CheckpointManager directory of one training run."""
        return self.root / "checkpoints" / name

    def metrics(self, name: str) -> Any:
        """JSONL training/validation metrics of one training run."""
        return self.root / "logs" / f"{name}.jsonl"

    def vector(self, name: str) -> Any:
        """Distribution vector of one distribution."""
        return self.root / "vectors" / name

    @property
    def search_dir(self) -> Any:
        """Weight-search table, plot and chosen weights."""
        return self.root / "search"

    @property
    def mixture_dir(self) -> Any:
        """TaskPGM mixture proportions, similarity matrices and heatmap."""
        return self.root / "mixture"

    @property
    def mixture_proportions(self) -> Any:
        """The TaskPGM proportions ``data.mixture: taskpgm`` trains with."""
        return self.mixture_dir / "proportions.json"

    @property
    def merged_model(self) -> Any:
        """The DEM model: base + chosen weighted vectors."""
        return self.root / "models" / "dem"
