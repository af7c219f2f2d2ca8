"""``dem-jax score --model PATH --data NAME=FILE.jsonl [...] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dem_jax.commands.help import add_named, add_subcommand
from dem_jax.errors import DemError


def register(sub) -> None:
    """Add the ``score`` subcommand."""
    p = add_subcommand(sub, "score", run)
    p.add_argument("--model", required=True, help="Hugging Face or dem-jax model directory")
    add_named(p, "--data", "NAME=FILE.jsonl", "a named JSONL file to score")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per row (default 512); a longer record is scored in pieces of this many "
        "tokens, each without the earlier pieces as context",
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    p.add_argument("--mesh", help="device mesh, e.g. fsdp=2,tensor=4 (default: one device)")
    p.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        help="one record per row, padded to --seq-len (default: several records packed per "
        "row, kept apart by segment ids; same sums and token counts, fewer rows)",
    )
    # Packing is the default; --packing stays accepted for scripts that pass it.
    p.add_argument(
        "--packing", dest="packing", action="store_true", default=True, help=argparse.SUPPRESS
    )
    p.add_argument(
        "--prompt-template", default="{prompt}", help="applied to prompt of prompt/completion"
    )
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--no-eos", action="store_true", help="do not append (and score) EOS")


def parse_data(items: list[str]) -> dict[str, str]:
    """['code=code.jsonl', ...] -> {'code': 'code.jsonl', ...}, in order."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DemError(f"--data: expected NAME=FILE.jsonl, got {item!r}")
        if name.strip() in out:
            raise DemError(f"--data: distribution {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    return out


def run(args: argparse.Namespace) -> int:
    """Load the model, score every file, print a table (or JSON) on stdout."""
    from dem_jax.commands.common import log, parse_mesh
    from dem_jax.data.records import read_jsonl
    from dem_jax.data.tokenize import check_tokenizer_fits, load_tokenizer
    from dem_jax.io.models import load_model, read_model_config
    from dem_jax.search.score import format_table, score_model
    from dem_jax.sharding.placement import check_batch_size

    datasets = parse_data(args.data)
    if args.seq_len < 2:
        raise DemError(f"--seq-len must be >= 2, got {args.seq_len}")
    mesh = parse_mesh(args.mesh)
    check_batch_size(args.batch_size, mesh)
    # Read every file before loading the model, so bad data fails fast.
    records = {name: read_jsonl(path) for name, path in datasets.items()}
    # And the tokenizer against the model's embedding, before its weights are read.
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    check_tokenizer_fits(tokenizer, read_model_config(args.model).vocab_size, str(args.model))
    start = time.perf_counter()
    model = load_model(args.model, mesh=mesh)
    log(f"loaded {args.model} ({time.perf_counter() - start:.1f}s)")
    scores = score_model(
        model,
        records,
        tokenizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        mesh=mesh,
        packing=args.packing,
        template=args.prompt_template,
        add_bos=not args.no_bos,
        add_eos=not args.no_eos,
        progress=log,
    )
    from dem_jax.sharding.distributed import is_main_process

    if not is_main_process():  # every process computed the same scores; one prints them
        return 0
    if args.json:
        out = {
            "model": str(args.model),
            "distributions": {name: s.to_dict() for name, s in scores.items()},
        }
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(format_table(scores))
    log(f"scored in {time.perf_counter() - start:.1f}s")
    return 0
