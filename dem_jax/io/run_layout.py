"""Where a run keeps its outputs, under ``RunConfig.output_dir``.

Every stage reads and writes through these paths so stages can be re-run,
skipped when complete, or run by hand in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dem_jax.config.run import RunConfig
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.outputs import check_disjoint, is_within

MIXTURE = "mixture"  # name of the data-mixing baseline's training run
BASE = "base"  # the training run that makes the run's own base (the pipeline's pretraining)
INIT = "init"  # the random initialisation of a base trained from model.init
# Model directories the layout itself names: no distribution may be called so.
RESERVED_MODELS = (BASE, INIT, MIXTURE, "dem", "dem-hf")

# What a run writes under output_dir; nothing it reads may lie in these.
WRITTEN = ("models", "checkpoints", "logs", "tensorboard", "vectors", "search", "mixture")
WRITTEN_FILES = ("report", "pipeline_state.json")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's outputs; ``root`` is a local path or a URL (``gs://...``)."""

    root: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", storage.path(self.root))

    @property
    def base_model(self) -> Any:
        """The base every fine-tune of a model.init run starts from: the pipeline's
        pretrained base (the training run named BASE), or, without pretraining, the
        random initialisation itself."""
        return self.model(BASE)

    @property
    def init_model(self) -> Any:
        """The random initialisation the pipeline pretrains ``base_model`` from (kept
        apart so that ``models/base`` is always the model the fine-tunes start from)."""
        return self.model(INIT)

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


def check_run_paths(cfg: RunConfig, config_file: storage.PathLike | None = None) -> None:
    """DemError, before any work, if a run's writes could touch what it reads:
    an input inside one of the folders it writes under ``output_dir``, or
    ``output_dir`` inside (or equal to) an input such as the base model.

    The run's own base (``models/base``, initialised or pretrained by the run) may be
    read from ``models/``: the run never rewrites it. A distribution may not be named
    like a directory the layout reserves (``base``, ``init``, ``dem``, ...).
    """
    layout = RunLayout(cfg.output_dir)
    clash = sorted(set(cfg.data.distributions) & set(RESERVED_MODELS))
    if clash:
        raise DemError(
            f"data.distributions: {clash[0]!r} names a directory the run writes itself "
            f"(models/{clash[0]}); rename the distribution"
        )
    inputs = [*cfg.input_paths(), ("run config", config_file)]
    rewritten = [layout.model(n) for n in (*cfg.data.distributions, MIXTURE)]
    rewritten += [layout.merged_model, layout.root / "models" / "dem-hf"]
    own_base = [
        (what, p)
        for what, p in inputs
        if what in ("base model", "tokenizer")
        and p is not None
        and is_within(p, layout.root / "models")
        and not any(is_within(p, r) or is_within(r, p) for r in rewritten)
    ]
    others = [i for i in inputs if i not in own_base]
    for name in (*WRITTEN, *WRITTEN_FILES):
        check_disjoint(layout.root / name, others, "output_dir")
    for what, p in inputs:
        if p is not None and storage.path(p).is_dir():
            check_disjoint(layout.root, [(what, p)], "output_dir", contains_ok=True)
