"""Nothing runs that the user did not write, and no input crashes or trains garbage.

Every case ends with one line ``dem-jax: error: ...`` and exit status 2, leaves its
output absent and its inputs as they were: a tokenizer asking to run its own code,
a safetensors index pointing outside its directory, data and config files that are
not what they claim (not UTF-8, a directory, empty, not a mapping, not an object), a
prompt template naming a missing field, a tokenizer larger than the model's
embedding, and a training run whose loss becomes NaN (which keeps its last good
checkpoint and writes no model).
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from hf_models import VOCAB, save_hf_model, save_tokenizer
from train_helpers import TINY

import dem_jax
from dem_jax import cli
from dem_jax.data import tokenize
from dem_jax.data.records import read_jsonl
from dem_jax.data.tokenize import check_ids_fit, load_tokenizer
from dem_jax.errors import DemError
from dem_jax.io.hf.safetensors_reader import SafetensorsCheckpoint
from dem_jax.search.score import score_model

BIG = VOCAB + 19  # a tokenizer with more tokens than the model has embedding rows
WORDS = [{"text": " ".join(f"w{(7 * i + j) % 90 + 3}" for j in range(12))} for i in range(12)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny HF model (and a copy), a too-large tokenizer, a data file."""
    root = tmp_path_factory.mktemp("untrusted")
    save_hf_model("llama_gqa", root / "hf")
    shutil.copytree(root / "hf", root / "hf2")
    save_tokenizer(root / "bigtok", vocab_size=BIG)
    (root / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WORDS))
    return root


def dem_error(capsys, *argv) -> str:
    """The one error line of a dem-jax command that must end with exit status 2."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_config(root: Path, tmp: Path, train: Path | None = None, **top) -> Path:
    """A run config on the HF model and one distribution ``w``."""
    cfg = {
        "output_dir": str(tmp / "out"),
        "model": {"path": str(root / "hf")},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {
            "seq_len": 16,
            "distributions": {
                "w": {"train": str(train or root / "w.jsonl"), "validation": str(root / "w.jsonl")}
            },
        },
        "train": {"steps": 2, "batch_size": 2, "compute_dtype": "float32", "eval_every": 0},
        "search": {"batch_size": 2},
        **top,
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def merge_config(root: Path, tmp: Path, data: Path | None = None, **top) -> Path:
    """A fisher MERGE.yaml over the HF model and its copy."""
    data = str(data or root / "w.jsonl")
    cfg = {
        "merge_method": "fisher",
        "models": [
            {"model": str(root / "hf"), "data": data},
            {"model": str(root / "hf2"), "data": data},
        ],
        "seq_len": 16,
        "batch_size": 2,
        **top,
    }
    path = tmp / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------
# 1. A model directory's Python code never runs
# --------------------------------------------------------------------------


def evil_tokenizer(root: Path, tmp: Path, in_config: bool = False) -> tuple[Path, Path]:
    """A copy of the tokenizer asking for its own class, whose module leaves a marker."""
    evil, marker = tmp / "evil", tmp / "code-ran"
    evil.mkdir()
    for f in (root / "hf").glob("*.json"):
        if f.name.startswith(("tokenizer", "special")) or f.name == "config.json":
            shutil.copy(f, evil / f.name)
    (evil / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    auto_map = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    name = "config.json" if in_config else "tokenizer_config.json"
    data = json.loads((evil / name).read_text())
    data["auto_map"] = auto_map
    if not in_config:
        data["tokenizer_class"] = "EvilTokenizer"
    (evil / name).write_text(json.dumps(data))
    return evil, marker


def test_tokenizer_with_auto_map_is_refused(capsys, root, tmp_path):
    evil, marker = evil_tokenizer(root, tmp_path)
    before = snapshot(evil)
    line = dem_error(
        capsys,
        "score",
        "--model",
        root / "hf",
        "--data",
        f"w={root / 'w.jsonl'}",
        "--tokenizer",
        evil,
    )
    assert f"{evil}: tokenizer_config.json has auto_map (custom code)" in line
    assert "never runs code from a model directory" in line
    assert not marker.exists() and snapshot(evil) == before


def test_config_auto_map_for_the_tokenizer_is_refused(root, tmp_path):
    evil, marker = evil_tokenizer(root, tmp_path, in_config=True)
    with pytest.raises(DemError, match=r"config\.json has auto_map"):
        load_tokenizer(evil)
    assert not marker.exists()
    # auto_map entries for model classes only (which dem-jax never loads) are harmless.
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    assert len(load_tokenizer(evil)) == VOCAB


def test_transformers_is_never_asked_to_trust_code(monkeypatch, root, tmp_path):
    """Even past our own check, transformers gets trust_remote_code=False: it runs no
    code from the directory and asks nothing on the terminal."""
    evil, marker = evil_tokenizer(root, tmp_path)
    asked = []
    monkeypatch.setattr(tokenize, "refuse_custom_code", lambda directory: None)
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    with pytest.raises(DemError, match="cannot load tokenizer"):
        load_tokenizer(evil)
    assert asked == [] and not marker.exists()


# --------------------------------------------------------------------------
# 3. A safetensors index only names files inside its directory
# --------------------------------------------------------------------------


def sharded_copy(root: Path, tmp: Path, entry: str) -> Path:
    """The HF model with an index whose every entry is ``entry``, and a real weights
    file where ``../elsewhere/model.safetensors`` points."""
    model = tmp / "models" / "sharded"
    model.mkdir(parents=True)
    shutil.copy(root / "hf" / "config.json", model / "config.json")
    shutil.copy(root / "hf" / "model.safetensors", model / "model-00001-of-00001.safetensors")
    elsewhere = tmp / "models" / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(root / "hf" / "model.safetensors", elsewhere / "model.safetensors")
    with SafetensorsCheckpoint(root / "hf") as ckpt:
        names = ckpt.keys()
    index = {"metadata": {}, "weight_map": {n: entry for n in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize(
    "entry",
    [
        "../elsewhere/model.safetensors",
        "ABS",
        "sub/x.safetensors",
        "..",
        ".",
        "a\\b.safetensors",
        "C:x.safetensors",
        "",
    ],
)
def test_index_entries_outside_the_directory_are_refused(root, tmp_path, entry):
    if entry == "ABS":
        entry = str(tmp_path / "models" / "elsewhere" / "model.safetensors")
    model = sharded_copy(root, tmp_path, entry)
    with pytest.raises(DemError) as e:
        SafetensorsCheckpoint(model)
    assert str(model / "model.safetensors.index.json") in str(e.value)
    message = str(e.value)
    assert repr(entry) in message and "not a file name inside the model directory" in message


def test_escaping_index_fails_the_cli(capsys, root, tmp_path):
    model = sharded_copy(root, tmp_path, "../elsewhere/model.safetensors")
    line = dem_error(capsys, "convert", "hf-to-orbax", model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "model.safetensors.index.json" in line and "../elsewhere/model.safetensors" in line


# --------------------------------------------------------------------------
# 4. Data and config files that are not what they claim
# --------------------------------------------------------------------------

BAD_LINES = {
    "not_utf8": (b'{"text": "w5 \xff w6"}\n', ":2: not UTF-8 text (byte 0xff at column 14)"),
    "not_object": (b"[1, 2]\n", ":2: expected a JSON object, got list"),
    "surrogate": (b'{"text": "w5 \\ud800"}\n', ":2: 'text' is not valid Unicode text"),
    "deep": (b"[" * 100_000 + b"\n", ":2: malformed JSON"),
    "number_text": (b'{"text": 5}\n', ":2: 'text' must be a string"),
}


def bad_jsonl(tmp: Path, case: str) -> tuple[Path, str]:
    line, needle = BAD_LINES[case]
    path = tmp / f"{case}.jsonl"
    path.write_bytes(b'{"text": "w3 w4 w5"}\n' + line)
    return path, f"{path}{needle}"


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_lines(tmp_path, case):
    path, needle = bad_jsonl(tmp_path, case)
    with pytest.raises(DemError) as e:
        read_jsonl(path)
    assert needle in str(e.value)


def test_bad_jsonl_in_every_command(capsys, root, tmp_path):
    path, needle = bad_jsonl(tmp_path, "not_utf8")
    before = path.read_bytes()
    assert needle in dem_error(capsys, "score", "--model", root / "hf", "--data", f"w={path}")
    config = run_config(root, tmp_path, train=path)
    assert needle in dem_error(capsys, "train", config, "--distribution", "w")
    assert needle in dem_error(capsys, "search", config)
    merge = merge_config(root, tmp_path, data=path)
    assert needle in dem_error(capsys, "merge", merge, "--out", tmp_path / "merged")
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
    assert path.read_bytes() == before
    # A directory where a data file belongs.
    line = dem_error(capsys, "score", "--model", root / "hf", "--data", f"w={tmp_path}")
    assert f"{tmp_path}: is a directory, expected a JSONL data file" in line


BAD_YAML = {
    "directory": (None, "is a directory, expected a YAML config file"),
    "empty": (b"", "the file is empty (expected a YAML mapping)"),
    "comments_only": (b"# nothing\n", "the file is empty"),
    "list": (b"- a\n- b\n", "expected a YAML mapping at the top level, got list"),
    "scalar": (b"hello\n", "expected a YAML mapping at the top level, got str"),
    "binary": (bytes(range(256)) * 4, "not a YAML file (byte 0x80 at offset 128"),
    "nul": (b"a: \x00\x01\n", "invalid YAML"),
    "bad_date": (b"when: 2024-13-45\n", "invalid YAML (month must be in 1..12)"),
    "int_keys": (b"1: a\nb: c\n", "unknown key"),
}


def bad_yaml(tmp: Path, case: str) -> Path:
    content, _ = BAD_YAML[case]
    path = tmp / f"{case}.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_yaml_files(capsys, tmp_path, case):
    path = bad_yaml(tmp_path, case)
    needle = BAD_YAML[case][1]
    line = dem_error(capsys, "train", path, "--distribution", "w")
    assert str(path) in line and needle in line, line
    line = dem_error(capsys, "merge", path, "--out", tmp_path / "merged")
    assert str(path) in line and needle in line, line
    assert not (tmp_path / "merged").exists()


def test_bad_override_value_and_distributions_list(capsys, root, tmp_path):
    config = run_config(root, tmp_path)
    line = dem_error(capsys, "train", config, "--distribution", "w", "train.steps=[1")
    assert "override 'train.steps=[1': invalid YAML value" in line
    line = dem_error(capsys, "train", config, "--distribution", "w", "data.distributions=[a, b]")
    assert "data.distributions: expected a mapping" in line


def test_prompt_template_naming_a_missing_field(capsys, root, tmp_path):
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "w3 w4", "completion": "w5 w6"}) + "\n")
    line = dem_error(
        capsys,
        "score",
        "--model",
        root / "hf",
        "--data",
        f"pc={pc}",
        "--prompt-template",
        "Q: {question}",
    )
    assert "'Q: {question}' names the field {question}, but only {prompt}" in line
    config = run_config(root, tmp_path, train=pc)
    line = dem_error(
        capsys, "train", config, "--distribution", "w", "data.prompt_template='Q: {question}'"
    )
    assert "data.prompt_template: 'Q: {question}' names the field {question}" in line
    merge = merge_config(root, tmp_path, data=pc, prompt_template="{prompt} {0}")
    line = dem_error(capsys, "merge", merge, "--out", tmp_path / "merged")
    assert "prompt_template: '{prompt} {0}' is not a template with only {prompt}" in line
    for template in ("{prompt", "{prompt!x}", "{prompt:d}"):
        line = dem_error(
            capsys,
            "score",
            "--model",
            root / "hf",
            "--data",
            f"pc={pc}",
            "--prompt-template",
            template,
        )
        assert "write {{ and }} for a literal brace" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------
# 5. A tokenizer larger than the model's embedding
# --------------------------------------------------------------------------


def test_tokenizer_larger_than_the_model(capsys, root, tmp_path):
    sizes = f"tokenizer {root / 'bigtok'} has {BIG} tokens (ids up to {BIG - 1}) but the model's"
    data = f"w={root / 'w.jsonl'}"
    line = dem_error(
        capsys, "score", "--model", root / "hf", "--data", data, "--tokenizer", root / "bigtok"
    )
    assert sizes in line and f"vocab_size is {VOCAB}" in line
    config = run_config(root, tmp_path)
    overrides = [f"data.tokenizer={root / 'bigtok'}"]
    line = dem_error(capsys, "train", config, "--distribution", "w", *overrides)
    assert sizes in line and f"vocab_size is {VOCAB}" in line
    line = dem_error(capsys, "search", config, *overrides)
    assert sizes in line and f"vocab_size is {VOCAB}" in line
    merge = merge_config(root, tmp_path, tokenizer_source=str(root / "bigtok"))
    line = dem_error(capsys, "merge", merge, "--out", tmp_path / "merged")
    assert sizes in line and f"vocab_size is {VOCAB}" in line
    # A model initialised from scratch (configs/tiny.yaml: vocab_size 55).
    out = tmp_path / "tiny"
    line = dem_error(
        capsys, "train", TINY, "--distribution", "sort", f"output_dir={out}", *overrides
    )
    assert "model.init: tokenizer" in line and "vocab_size is 55" in line
    assert not out.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "merged").exists()


class LyingTokenizer:
    """Claims a small vocabulary but produces ids past the model's embedding."""

    def __init__(self, inner, shift: int):
        self.inner, self.shift = inner, shift
        self.bos_token_id = self.eos_token_id = None
        self.all_special_ids, self.name_or_path = [], "liar"

    def __len__(self):
        return 3

    def get_vocab(self):
        return {"a": 0, "b": 1, "c": 2}

    def __call__(self, text, add_special_tokens=False):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [i + self.shift for i in ids]}


def test_ids_past_the_embedding_are_caught_per_batch(root):
    model = dem_jax.load_model(root / "hf")
    liar = LyingTokenizer(load_tokenizer(root / "hf"), shift=VOCAB)
    with pytest.raises(DemError, match=f"w: token id .* vocab_size is {VOCAB}"):
        score_model(model, {"w": WORDS}, tokenizer=liar, batch_size=2, seq_len=16)
    with pytest.raises(DemError, match=f"token id {VOCAB} in the tokenised data"):
        check_ids_fit([np.arange(VOCAB + 1)], VOCAB, "x")
    check_ids_fit([np.arange(VOCAB)], VOCAB, "x")


# --------------------------------------------------------------------------
# 6. A loss that becomes NaN stops training; the last good checkpoint stays
# --------------------------------------------------------------------------


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(capsys, root, tmp_path):
    # The learning rate warms up from 0: step 1 leaves the weights as they are, step 2
    # throws them to ~1e29, and the loss of step 3 is NaN. Divergence is noticed at the
    # checkpoint of step 3 (no log line before step 4), before anything is saved.
    train = {
        "steps": 6,
        "batch_size": 2,
        "learning_rate": 1.0e30,
        "warmup_steps": 5,
        "log_every": 4,
        "eval_every": 0,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "async_checkpoint": False,
        "compute_dtype": "float32",
    }
    config = run_config(root, tmp_path, train=None)
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "train": train}))
    out = tmp_path / "out"
    line = dem_error(capsys, "train", config, "--distribution", "w")
    checkpoints = out / "checkpoints" / "w"
    assert "training loss became nan at step 3" in line
    assert f"last good checkpoint: step 2 in {checkpoints}" in line
    assert not (out / "models" / "w").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]
    state = ocp.StandardCheckpointer().restore(checkpoints / "2" / "state")
    assert int(state["step"]) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    logged = (out / "logs" / "w.jsonl").read_text() if (out / "logs" / "w.jsonl").exists() else ""
    assert "NaN" not in logged and "Infinity" not in logged
