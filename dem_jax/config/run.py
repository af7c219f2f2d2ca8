"""Run configuration: one YAML file drives training, scoring, search and the pipeline.

Every field has a comment; unknown keys and wrong types are reported with their
dotted path by :mod:`dem_jax.config.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dem_jax.config.model import DTYPES
from dem_jax.errors import DemError, did_you_mean


@dataclass
class MeshConfig:
    """Device mesh; one size may be -1 for "all remaining devices"."""

    data: int = 1  # pure data parallelism
    fsdp: int = -1  # data parallelism with sharded params and optimizer state
    expert: int = 1  # expert parallelism for mixture-of-experts models (batches split too)
    tensor: int = 1  # tensor parallelism over heads / MLP / vocab
    slice: str | None = None  # TPU accelerator type this mesh is laid out for, e.g. v4-32


@dataclass
class DistributionConfig:
    """One data distribution: a training file and how to validate on it."""

    train: str  # JSONL file: {"text": ...} or {"prompt": ..., "completion": ...}
    validation: str | None = None  # held-out JSONL; default: split off validation_fraction
    validation_fraction: float = 0.1  # used when `validation` is not given
    max_examples: int | None = None  # read at most this many training records


MIXTURES = ("uniform", "size", "taskpgm")  # named data.mixture choices


def check_prompt_template(template: str, where: str) -> None:
    """DemError unless ``template`` is a ``str.format`` template whose only field is
    ``{prompt}`` (the one value filled in), e.g. ``"Question: {prompt}\\nAnswer:"``."""
    braces = "write {{ and }} for a literal brace"
    try:
        template.format(prompt="")
    except KeyError as e:
        raise DemError(
            f"{where}: {template!r} names the field {{{e.args[0]}}}, but only {{prompt}} "
            f"is filled in ({braces})"
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        raise DemError(
            f"{where}: {template!r} is not a template with only {{prompt}} in it ({e}; {braces})"
        ) from None


@dataclass
class DataConfig:
    """Tokenisation, packing and the distributions to train on."""

    distributions: dict[str, DistributionConfig] = field(default_factory=dict)
    tokenizer: str | None = None  # tokenizer directory; default: the base model's
    seq_len: int = 512  # tokens per training row
    # Pack several documents per training row (segment ids keep them apart); scoring
    # (evaluation, search) always packs, since the sums are the same either way.
    packing: bool = True
    prompt_template: str = "{prompt}"  # applied to `prompt` of prompt/completion records
    add_bos: bool = True  # prepend the tokenizer's BOS token, if it has one
    add_eos: bool = True  # append EOS, so models learn to stop
    shuffle_seed: int = 0  # data order; fixed so runs and resumes are reproducible
    # Mixture for the data-mixing baseline: "uniform", "size" (proportional to
    # training tokens), "taskpgm" (output_dir/mixture/proportions.json, written by
    # `dem-jax mixture`) or an explicit {name: weight} mapping.
    mixture: str | dict[str, float] = "uniform"

    def __post_init__(self):
        if self.seq_len < 2:
            raise DemError(f"data.seq_len must be >= 2, got {self.seq_len}")
        check_prompt_template(self.prompt_template, "data.prompt_template")
        if isinstance(self.mixture, str) and self.mixture not in MIXTURES:
            raise DemError(
                "data.mixture must be 'uniform', 'size', 'taskpgm' or a mapping, "
                f"got {self.mixture!r}"
            )
        for name, dist in self.distributions.items():
            if not 0.0 < dist.validation_fraction < 1.0:
                raise DemError(f"data.distributions.{name}.validation_fraction must be in (0, 1)")


@dataclass
class TrainConfig:
    """Optimisation and checkpointing for one fine-tuning run."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # global rows per optimizer step (across all hosts)
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    learning_rate: float = 3e-4  # peak learning rate
    warmup_steps: int = 10  # linear warmup from 0
    schedule: str = "cosine"  # decay after warmup: cosine, linear or constant
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"  # activations and matmuls
    remat: bool = False  # recompute whole layers in the backward pass (off: keep matmul outputs)
    seed: int = 0  # parameter init (when training from scratch) and dropout-free RNG
    eval_every: int = 50  # validation every N steps (0: only at the end)
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole split
    log_every: int = 10  # metrics line every N steps
    checkpoint_every: int = 50  # save every N steps (0: only at the end)
    keep_checkpoints: int = 2  # keep the last N checkpoints
    async_checkpoint: bool = True  # save in the background (on accelerators; CPU saves block)

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise DemError("train.steps, train.batch_size and train.grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise DemError(
                f"train.batch_size ({self.batch_size}) must be divisible by "
                f"train.grad_accum ({self.grad_accum})"
            )
        if self.schedule not in ("cosine", "linear", "constant"):
            raise DemError(
                f"train.schedule must be cosine, linear or constant, got {self.schedule!r}"
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise DemError(f"train.{name}: {getattr(self, name)!r} is not one of {DTYPES}")


@dataclass
class BaseModelConfig:
    """Where the base model comes from."""

    path: str | None = None  # Hugging Face or dem-jax directory
    # Architecture for a model initialised from scratch (tiny configs, tests).
    init: dict[str, Any] | None = None
    # Known architecture name (dem_jax.plan.architectures.KNOWN_ARCHITECTURES), so `dem-jax plan`
    # works without the weights at hand.
    arch: str | None = None


# search.strategy choices; bayes is Optuna's TPE sampler over the grid's box.
STRATEGIES = ("grid", "random", "bayes", "gradient")


def check_strategy(name: str) -> None:
    """DemError unless ``name`` is one of STRATEGIES, suggesting the closest one."""
    if name in STRATEGIES:
        return
    raise DemError(
        f"search.strategy: unknown strategy {name!r} "
        f"({did_you_mean(name, STRATEGIES)}known: {', '.join(STRATEGIES)})"
    )


@dataclass
class SearchConfig:
    """How merge weights (omega) are chosen by validation perplexity (see dem_jax.search)."""

    # grid (the paper's protocol), random (Dirichlet samples), bayes (TPE over the grid's
    # box) or gradient (Adam on omega). bayes is the default: on the demo it reached the
    # 5^4 grid's best (within 1e-3) in a median of 16 candidates, at most 29 over ten
    # seeds, against 625 for the grid (bench/bench_search.py).
    strategy: str = "bayes"
    # Distributions to merge (each must be in data.distributions); default: all of them.
    distributions: list[str] | None = None
    # grid: candidate values, one list for every distribution or {name: list};
    # bayes: each distribution's omega ranges over [min, max] of its list.
    grid: list[float] | dict[str, list[float]] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    samples: int = 48  # random, bayes: number of candidates (bayes: TPE trials)
    concentration: float = 1.0  # random: Dirichlet concentration
    scale: float = 1.0  # random: samples are scaled to sum to this
    steps: int = 30  # gradient: optimisation steps (each one forward and one backward pass)
    learning_rate: float = 0.05  # gradient: Adam step size on omega
    init: float = 0.5  # gradient: starting value of every omega
    per_layer: bool = False  # gradient, bayes: one omega per layer and distribution
    # mean_log_ppl: mean over distributions of log-perplexity on their own split;
    # weighted_log_ppl: the same with objective_weights; max_log_ppl: the worst one.
    objective: str = "mean_log_ppl"
    objective_weights: dict[str, float] | None = None  # weighted_log_ppl: {name: weight}
    batch_size: int = 8  # validation rows per forward pass
    max_batches: int = 0  # validation batches per distribution; 0 = all
    seed: int = 0  # random: sampling seed; bayes: TPE sampler seed

    def __post_init__(self):
        check_strategy(self.strategy)
        if self.objective not in ("mean_log_ppl", "weighted_log_ppl", "max_log_ppl"):
            raise DemError(
                "search.objective must be mean_log_ppl, weighted_log_ppl or max_log_ppl, "
                f"got {self.objective!r}"
            )
        if self.objective == "weighted_log_ppl" and not self.objective_weights:
            raise DemError("search.objective_weights: needed by objective weighted_log_ppl")
        if self.objective_weights and (
            any(w < 0 for w in self.objective_weights.values())
            or sum(self.objective_weights.values()) <= 0
        ):
            raise DemError("search.objective_weights: weights must be >= 0 and not all zero")
        lists = self.grid.values() if isinstance(self.grid, dict) else [self.grid]
        if any(len(values) == 0 for values in lists):
            raise DemError("search.grid: every value list must be non-empty")
        for name in ("samples", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise DemError(f"search.{name} must be positive, got {getattr(self, name)}")
        if self.concentration <= 0 or self.learning_rate <= 0 or self.max_batches < 0:
            raise DemError(
                "search.concentration and search.learning_rate must be > 0, search.max_batches >= 0"
            )


@dataclass
class PretrainConfig:
    """Pretraining of a from-scratch base (tiny configs and the demo only)."""

    steps: int = 0  # 0: use model.path / model.init as the base without pretraining
    distributions: list[str] | None = None  # data the base is pretrained on; default all
    learning_rate: float = 3e-3
    batch_size: int = 16


@dataclass
class TaskPGMConfig:
    """TaskPGM mixture proportions from fine-tuned models' similarity (dem_jax.mixture.taskpgm)."""

    similarity: str = "pmi"  # pmi (log-likelihood ratios) or jsd (next-token distributions)
    lam: float = 1.0  # weight of the redundancy (pairwise) term
    beta: float = 1.0  # weight of the representativeness (unary) term
    method: str = "exact"  # exact (active set) or closed_form (the paper's, then projected)
    batch_size: int = 8  # validation rows per forward pass
    max_examples: int = 0  # validation records per distribution; 0 = all

    def __post_init__(self):
        if self.similarity not in ("pmi", "jsd"):
            raise DemError(
                f"pipeline.taskpgm.similarity must be pmi or jsd, got {self.similarity!r}"
            )
        if self.method not in ("exact", "closed_form"):
            raise DemError(
                f"pipeline.taskpgm.method must be exact or closed_form, got {self.method!r}"
            )
        if self.lam <= 0 or self.batch_size <= 0 or self.max_examples < 0:
            raise DemError("pipeline.taskpgm: lam and batch_size must be > 0, max_examples >= 0")


BASELINES = ("uniform_soup", "task_arithmetic", "ties", "dare_linear", "fisher", "regmean")


@dataclass
class PipelineConfig:
    """What `dem-jax pipeline` runs besides DEM itself."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # Data-mixing baselines, each a full training run on all distributions:
    # "uniform", "size", "taskpgm" (proportions from the fine-tunes, see taskpgm)
    # or {name: weight} mixtures.
    mixtures: list[str | dict[str, float]] = field(default_factory=lambda: ["uniform", "size"])
    # Steps of each mixture run; default train.steps x number of distributions, i.e.
    # the same data exposure as all the fine-tunes together.
    mixture_steps: int | None = None
    # Merge baselines: over the same distribution vectors, and (fisher, regmean)
    # over the fine-tunes with statistics from their validation rows.
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    task_arithmetic_grid: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.25]
    )  # one lambda for every vector, chosen by the same validation objective
    density: float = 0.5  # ties / dare_linear density
    seed: int = 0  # dare_linear's random drop
    regmean_alpha: float = 0.9  # regmean: off-diagonal Gram entries scaled by this
    taskpgm: TaskPGMConfig = field(default_factory=TaskPGMConfig)
    answer_eval: bool = True  # exact-match accuracy where records have an "answer"
    max_new_tokens: int = 16  # greedy decoding budget for answers
    # Validation records per distribution for answer accuracy, and for the
    # fisher/regmean statistics.
    eval_max_examples: int = 200
    export_hf: bool = True  # export the DEM model to Hugging Face format

    def __post_init__(self):
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise DemError(
                f"pipeline.baselines: unknown {unknown[0]!r} "
                f"(known: {', '.join(sorted(BASELINES))})"
            )
        if not 0.0 < self.density <= 1.0:
            raise DemError(f"pipeline.density must be in (0, 1], got {self.density}")
        if not 0.0 <= self.regmean_alpha <= 1.0:
            raise DemError(f"pipeline.regmean_alpha must be in [0, 1], got {self.regmean_alpha}")


@dataclass
class RunConfig:
    """Everything one dem-jax run needs."""

    output_dir: str  # all outputs: checkpoints, models, vectors, reports
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def input_paths(self) -> list[tuple[str, str | None]]:
        """Every path the run reads, as ``(what, path)``: its outputs must avoid them."""
        paths: list[tuple[str, str | None]] = [
            ("base model", self.model.path),
            ("tokenizer", self.data.tokenizer),
        ]
        for name, d in self.data.distributions.items():
            paths += [(f"{name} training file", d.train), (f"{name} validation file", d.validation)]
        return paths

    def __post_init__(self):
        if (self.model.path is None) == (self.model.init is None):
            raise DemError("model: give exactly one of model.path and model.init")
