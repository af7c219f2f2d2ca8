"""Built-in synthetic data: a character tokenizer and small distributions whose
answers can be checked, for the demo, the tiny config and tests.

    python -m dem_jax.demo.synthetic OUT_DIR     # writes tokenizer/ and <name>.jsonl files
"""

from __future__ import annotations

import json
import random
import string
import sys
from collections.abc import Callable
from pathlib import Path

CHARS = string.ascii_lowercase + string.digits + " +-*=:>.,?!'"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def write_char_tokenizer(directory: str | Path) -> Path:
    """A character-level fast tokenizer (one token per character) saved for AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def vocab_size() -> int:
    """Size of the character tokenizer's vocabulary."""
    return len(SPECIAL) + len(CHARS)


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return {"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"{a}-{b}=", "completion": str(a - b), "answer": str(a - b)}


def _reverse(rng: random.Random) -> dict:
    word = "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(3, 7)))
    return {"prompt": f"reverse {word}:", "completion": word[::-1], "answer": word[::-1]}


def _sort(rng: random.Random) -> dict:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 7)))
    answer = "".join(sorted(digits))
    return {"prompt": f"sort {digits}:", "completion": answer, "answer": answer}


_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher"]
_VERBS = ["sees", "likes", "finds", "paints", "follows", "calls"]
_OBJECTS = ["the river", "a red ball", "the big house", "a green tree", "the moon", "her book"]
_ENDINGS = [".", " today.", " again.", " at night.", " in the park."]


def _text(rng: random.Random) -> dict:
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        for _ in range(rng.randint(1, 3))
    ]
    return {"text": " ".join(sentences)}


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "text": _text,
}


def make_records(name: str, count: int, seed: int) -> list[dict]:
    """``count`` records of one built-in distribution, reproducible by seed."""
    rng = random.Random(f"{name}:{seed}")
    return [GENERATORS[name](rng) for _ in range(count)]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Records as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_distributions(
    directory: str | Path,
    names=tuple(GENERATORS),
    n_train: int = 400,
    n_val: int = 60,
    seed: int = 0,
) -> dict[str, tuple[Path, Path]]:
    """<name>.train.jsonl / <name>.val.jsonl for each distribution."""
    directory = Path(directory)
    out = {}
    for name in names:
        records = make_records(name, n_train + n_val, seed)
        out[name] = (
            write_jsonl(directory / f"{name}.train.jsonl", records[:n_train]),
            write_jsonl(directory / f"{name}.val.jsonl", records[n_train:]),
        )
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "synthetic")
    write_char_tokenizer(target / "tokenizer")
    for name, (train, val) in write_distributions(target).items():
        print(name, train, val)
