"""The pipeline's stages as a user follows them: a ``stage k/N: name`` line on the
log as each begins, and each stage's wall time for the report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dem_jax.config.run import RunConfig

BASE = "base model"
FINETUNES = "fine-tunes"
VECTORS = "distribution vectors"
SEARCH = "weight search"
MERGES = "merge baselines"
TASKPGM = "TaskPGM proportions"
MIXING = "data-mixing runs"
EVALUATION = "evaluation"
EXPORT = "Hugging Face export"
REPORT = "report"


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """The run config that pretrains the shared base: ``pipeline.pretrain``'s steps,
    learning rate and batch size on a uniform mixture, without periodic evaluation."""
    pre = cfg.pipeline.pretrain
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train,
            steps=pre.steps,
            learning_rate=pre.learning_rate,
            batch_size=pre.batch_size,
            eval_every=0,
        ),
        data=dataclasses.replace(cfg.data, mixture="uniform"),
    )


def stage_names(cfg: RunConfig) -> list[str]:
    """The stages ``cfg`` runs, in order."""
    p = cfg.pipeline
    names = [BASE] if cfg.model.init is not None else []
    names += [FINETUNES, VECTORS, SEARCH]
    names += [MERGES] if p.baselines else []
    names += [TASKPGM] if "taskpgm" in p.mixtures else []
    names += [MIXING] if p.mixtures else []
    names += [EVALUATION]
    names += [EXPORT] if p.export_hf else []
    return [*names, REPORT]


class StageLog:
    """``with stages.run(NAME, detail):`` logs ``stage k/N: NAME (detail)`` and times it."""

    def __init__(self, names: list[str], log: Callable[[str], None]):
        self.names, self.log = names, log
        self.wall_s: dict[str, float] = {}

    @contextmanager
    def run(self, name: str, detail: str = "") -> Iterator[None]:
        """Announce stage ``name`` and record its wall seconds once it ends."""
        k = self.names.index(name) + 1
        self.log(f"stage {k}/{len(self.names)}: {name}" + (f" ({detail})" if detail else ""))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wall_s[name] = round(time.perf_counter() - start, 3)
