"""Every subcommand's ``--help`` line and description, in one place, and the one
function that adds a subcommand with them (no JAX is imported: ``--help`` stays fast)."""

from __future__ import annotations

# name: (the line in `dem-jax --help`, the description in `dem-jax NAME --help`)
TEXTS = {
    "convert": ("convert between Hugging Face and dem-jax formats", None),
    "demo": ("run the built-in demo on CPU", None),
    "merge": ("merge models as a mergekit MERGE.yaml says", None),
    "mixture": (
        "TaskPGM mixture proportions from the fine-tuned models' similarity",
        (
            "Load the fine-tuned model of every distribution (output_dir/models/NAME), compute "
            "their PMI and JSD similarity on the validation sets and the TaskPGM proportions from"
            " the one pipeline.taskpgm.similarity names. Writes proportions.json, similarity.json"
            " (both matrices) and heatmap.png under output_dir/mixture/; train with them with "
            "data.mixture=taskpgm."
        ),
    ),
    "pipeline": (
        "the whole DEM method: fine-tunes, vectors, search, baselines, report, export",
        (
            "Run every stage of DEM from one config. Completed stages are skipped on a re-run, so"
            " adding a distribution trains only that one."
        ),
    ),
    "plan": (
        "per-device memory plan of a run config on a TPU slice",
        (
            "Estimate the memory each device needs to fine-tune with CONFIG (parameters, AdamW "
            "state, gradients, activations, sharded by the config's mesh) and compare it with the"
            " slice's HBM. Exit status 0 if it fits, 2 if not. Needs no weights: the architecture"
            " comes from --model-config, model.init, a local model.path, or the shipped configs' "
            "own table."
        ),
    ),
    "score": (
        "perplexity, mean NLL and bits per byte of a model per distribution",
        (
            "Score a model on JSONL files: token-weighted mean NLL over loss tokens, perplexity ="
            " exp(mean NLL), loss-token count, and bits per byte (NLL in bits over the UTF-8 "
            "bytes of each record's text, or completion for prompt/completion records)."
        ),
    ),
    "search": (
        "choose merge weights by validation perplexity and write the merged model",
        (
            "Search merge weights omega for base + sum_i omega_i (finetuned_i - base) (strategy "
            "from the config's search section: bayes (the default, TPE), grid, random or "
            "gradient). Writes the candidate table (CSV, JSON), the chosen omega and a plot "
            "under output_dir/search/, and the merged model to output_dir/models/dem."
        ),
    ),
    "train": (
        "fine-tune the base on one distribution, or on the mixture",
        (
            "Fine-tune the base model. Resumes from the latest checkpoint in output_dir; SIGTERM "
            "saves a checkpoint and exits (status 143)."
        ),
    ),
    "vectors": ("distribution vectors (fine-tuned - base) and their diagnostics", None),
}


def add_subcommand(sub, name: str, run):
    """Add subcommand ``name`` (help and description from :data:`TEXTS`) that calls
    ``run(args)``; returns its parser for the arguments."""
    help_line, description = TEXTS[name]
    p = sub.add_parser(name, help=help_line, description=description)
    p.set_defaults(func=run)
    return p


def add_named(p, flag: str, metavar: str, what: str) -> None:
    """A required ``flag NAME=VALUE`` option, given once per distribution."""
    p.add_argument(
        flag, action="append", required=True, metavar=metavar, help=f"{what}; one per distribution"
    )
