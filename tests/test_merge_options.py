"""``dem-jax merge``'s mergekit options (``chat_template`` in MERGE.yaml; the flags
``--out-shard-size``, ``--copy-tokenizer/--no-copy-tokenizer``, ``--allow-crimes``,
``--random-seed``, ``--quiet``) against the real mergekit 0.1.5 run on the same YAML,
and the progress bar on stderr."""

from __future__ import annotations

import json
import re
import shutil

# mergekit is a test extra: the reference these tests exist for, so no skip if missing.
import mergekit  # noqa: F401
import numpy as np
import pytest
import yaml
from hf_models import save_hf_model
from safetensors.numpy import load_file
from test_merge import make_family

from dem_jax import cli
from dem_jax.commands.common import parse_kmb
from dem_jax.errors import DemError
from dem_jax.merge.chat_template import MERGEKIT_TEMPLATES, resolve_chat_template

TEMPLATE_A = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
MESSAGES = [{"role": "user", "content": "w3 w4"}, {"role": "assistant", "content": "w5"}]
# tokenizer_config.json keys allowed to differ: transformers 5 adds the first two when
# mergekit re-saves a tokenizer; dem-jax's exports fix the last two (io/assets.py).
CONFIG_NOISE = {"is_local", "local_files_only", "model_max_length", "tokenizer_class"}
FLAGS = [
    ("--out-shard-size", "5B"),
    ("--copy-tokenizer",),
    ("--no-copy-tokenizer",),
    ("--allow-crimes",),
    ("--no-allow-crimes",),
    ("--random-seed", "1"),
    ("--quiet",),
    ("--no-quiet",),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("ofamily"), n=2)


@pytest.fixture(scope="module")
def templated(family, tmp_path_factory):
    """The family with chat templates: A in the base's tokenizer_config.json (the older
    place) and in ft1's chat_template.jinja, each with other whitespace around it (a
    majority only once stripped), B in ft2's."""
    root = tmp_path_factory.mktemp("templated")
    paths = [shutil.copytree(p, root / p.name) for p in family]
    cfg_path = paths[0] / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": TEMPLATE_A + "\n"}))
    (paths[1] / "chat_template.jinja").write_text(f"\n{TEMPLATE_A}\n  ")
    (paths[2] / "chat_template.jinja").write_text(TEMPLATE_B)
    return paths


def task_arithmetic(family, **changes):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(family[0]),
        "models": [
            {"model": str(family[1]), "parameters": {"weight": 0.7}},
            {"model": str(family[2]), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    return {**cfg, **changes}


def run_ours(capsys, tmp_path, cfg, out, *flags):
    """``dem-jax merge`` on ``cfg`` (written as YAML), in process: (status, stderr)."""
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = cli.main([str(a) for a in ("merge", path, "--out", out, *flags)])
    return code, capsys.readouterr().err


def run_mergekit(cfg, out, **options):
    """mergekit 0.1.5's ``mergekit-yaml CONFIG OUT`` with ``options`` as its flags."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(out),
        MergeOptions(quiet=True, **options),
        config_source=yaml.safe_dump(cfg),
    )


def tensors(directory):
    """Every tensor of a HF output, whatever its sharding."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(ours, theirs, atol=1e-6):
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def tokenizer_files(directory):
    keep = ("tokenizer", "chat_template", "special_tokens_map", "added_tokens")
    return sorted(f.name for f in directory.iterdir() if f.name.startswith(keep))


def assert_same_tokenizer(ours, theirs):
    """The same tokenizer files, byte for byte but for tokenizer_config.json's
    known noise, and the same chat template applied by transformers."""
    from transformers import AutoTokenizer

    assert tokenizer_files(ours) == tokenizer_files(theirs)
    for name in tokenizer_files(theirs):
        if name != "tokenizer_config.json":
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    if "tokenizer_config.json" in tokenizer_files(theirs):
        a, b = (json.loads((d / "tokenizer_config.json").read_text()) for d in (ours, theirs))
        assert {k: v for k, v in a.items() if k not in CONFIG_NOISE} == {
            k: v for k, v in b.items() if k not in CONFIG_NOISE
        }
    if (theirs / "chat_template.jinja").is_file():
        a, b = (AutoTokenizer.from_pretrained(d) for d in (ours, theirs))
        assert a.apply_chat_template(MESSAGES, tokenize=False) == b.apply_chat_template(
            MESSAGES, tokenize=False
        )


def test_flags_and_size_syntax_are_mergekits():
    from mergekit.common import parse_kmb as mergekit_kmb
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    theirs = {o for p in mergekit_yaml.params for o in [*p.opts, *p.secondary_opts]}
    parser = cli.build_parser()
    for flag, *value in FLAGS:
        assert flag in theirs, flag
        args = parser.parse_args(["merge", "m.yaml", "--out", "o", flag, *value])
        assert args.command == "merge", flag
    for text in ("5B", "500m", "20k", "1000", "0", "3K", "2b"):
        assert parse_kmb(text) == mergekit_kmb(text), text
    for text in ("1.5B", "5GB", "-1", "20kB"):
        with pytest.raises(ValueError):
            mergekit_kmb(text)
        with pytest.raises(DemError, match="--out-shard-size: cannot parse"):
            parse_kmb(text)


def test_every_mergekit_template_name(monkeypatch):
    import importlib.util
    from importlib.resources import files

    from mergekit._data import chat_templates

    jinja = [f for f in files(chat_templates).iterdir() if f.name.endswith(".jinja")]
    shipped = {f.name.removesuffix(".jinja"): f.read_text() for f in jinja}
    assert sorted(shipped) == sorted(MERGEKIT_TEMPLATES)
    for name, text in shipped.items():
        assert resolve_chat_template(name, []) == text, name
    # dem-jax does not bundle them: without mergekit a name says so
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DemError, match="'chatml' is one of mergekit's templates"):
        resolve_chat_template("chatml", [])
    assert resolve_chat_template(TEMPLATE_A, []) == TEMPLATE_A


@pytest.mark.parametrize(
    "template, expect",
    [("chatml", "<|im_start|>"), (TEMPLATE_B + " ", TEMPLATE_B + " "), ("auto", TEMPLATE_A)],
    ids=["name", "literal", "auto"],
)
def test_chat_template_matches_mergekit(capsys, templated, tmp_path, template, expect):
    cfg = task_arithmetic(templated, chat_template=template)
    run_mergekit(cfg, tmp_path / "mk")
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "ours")
    assert code == 0, err
    assert_same_tokenizer(tmp_path / "ours", tmp_path / "mk")
    assert_same_tensors(tmp_path / "ours", tmp_path / "mk")
    text = (tmp_path / "ours" / "chat_template.jinja").read_text()
    assert expect in text and "chat_template" not in json.loads(
        (tmp_path / "ours" / "tokenizer_config.json").read_text()
    )
    if template != "chatml":  # auto: the majority, A, stripped; a literal as given
        assert text == expect


def test_auto_without_templates_keeps_the_tokenizer(capsys, family, tmp_path):
    cfg = task_arithmetic(family, chat_template="auto")
    run_mergekit(cfg, tmp_path / "mk")
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "ours")
    assert code == 0, err
    assert_same_tokenizer(tmp_path / "ours", tmp_path / "mk")
    assert not (tmp_path / "ours" / "chat_template.jinja").exists()


@pytest.mark.parametrize("tokenizer_source", [None, "base"])
def test_no_copy_tokenizer_matches_mergekit(capsys, family, tmp_path, tokenizer_source):
    cfg = task_arithmetic(family, tokenizer_source=tokenizer_source)
    run_mergekit(cfg, tmp_path / "mk", copy_tokenizer=False)
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "ours", "--no-copy-tokenizer")
    assert code == 0, err
    # mergekit writes a tokenizer_source's tokenizer all the same
    assert bool(tokenizer_files(tmp_path / "ours")) == (tokenizer_source is not None)
    assert_same_tokenizer(tmp_path / "ours", tmp_path / "mk")
    assert_same_tensors(tmp_path / "ours", tmp_path / "mk")
    assert (tmp_path / "ours" / "generation_config.json").is_file()  # dem-jax keeps it


def test_out_shard_size_matches_mergekit(capsys, family, tmp_path):
    cfg = task_arithmetic(family)
    run_mergekit(cfg, tmp_path / "mk", out_shard_size=parse_kmb("20k"))
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "ours", "--out-shard-size", "20k")
    assert code == 0, err
    indexes = [
        json.loads((tmp_path / d / "model.safetensors.index.json").read_text())
        for d in ("ours", "mk")
    ]
    assert sorted(indexes[0]["weight_map"]) == sorted(indexes[1]["weight_map"])
    assert indexes[0]["metadata"]["total_size"] == indexes[1]["metadata"]["total_size"]
    for d in ("ours", "mk"):  # mergekit's names; each shard within the limit
        shards = sorted(f.name for f in (tmp_path / d).glob("*.safetensors"))
        n = len(shards)
        assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for shard in shards:
            sizes = [t.nbytes for t in load_file(tmp_path / d / shard).values()]
            assert sum(sizes) <= 20_000 or len(sizes) == 1, (d, shard)
    assert_same_tensors(tmp_path / "ours", tmp_path / "mk")
    # --max-shard-size is the same limit in dem-jax's syntax; 0 means one file
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "alias", "--max-shard-size", "20kB")
    assert code == 0, err
    for f in (tmp_path / "ours").glob("model*"):
        assert f.read_bytes() == (tmp_path / "alias" / f.name).read_bytes(), f.name
    run_mergekit(cfg, tmp_path / "mk0", out_shard_size=0)
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "one", "--out-shard-size", "0")
    assert code == 0, err
    for d in ("one", "mk0"):
        assert [f.name for f in (tmp_path / d).glob("model*")] == ["model.safetensors"]


def test_allow_crimes_matches_mergekit(capsys, family, tmp_path):
    mistral = tmp_path / "mistral"
    save_hf_model("mistral", mistral, seed=3)
    cfg = task_arithmetic(
        family,
        models=[
            {"model": str(family[1]), "parameters": {"weight": 0.7}},
            {"model": str(mistral), "parameters": {"weight": 0.4}},
        ],
    )
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "refused")
    lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "architecture 'mistral' does not match" in lines[0] and "--allow-crimes" in lines[0]
    assert not (tmp_path / "refused").exists()
    run_mergekit(cfg, tmp_path / "mk", allow_crimes=True)
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "ours", "--allow-crimes")
    assert code == 0, err
    assert_same_tensors(tmp_path / "ours", tmp_path / "mk")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # the base's, as mergekit
    # a crime the tensors cannot carry: Qwen2's q/k/v biases have no Llama counterpart
    qwen = make_family(tmp_path / "q", n=0, case="qwen2_bias")[0]
    cfg["models"][1]["model"] = str(qwen)
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "qwen", "--allow-crimes")
    lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2 and len(lines) == 1 and "q_proj.bias" in lines[0], err
    assert not (tmp_path / "qwen").exists()


def test_random_seed_is_seed(capsys, family, tmp_path):
    cfg = task_arithmetic(family, merge_method="dare_ties", parameters={"density": 0.5})
    outputs = {}
    for flags in (("--seed", "3"), ("--random-seed", "3"), ("--random-seed", "4")):
        out = tmp_path / "-".join(flags).strip("-")
        code, err = run_ours(capsys, tmp_path, cfg, out, *flags)
        assert code == 0, err
        outputs[flags] = (out / "model.safetensors").read_bytes()
    assert outputs["--seed", "3"] == outputs["--random-seed", "3"]
    assert outputs["--seed", "3"] != outputs["--random-seed", "4"]


def test_progress_bar_is_one_line_on_stderr(capsys, family, tmp_path, monkeypatch):
    monkeypatch.delenv("DEM_JAX_QUIET", raising=False)
    cfg = task_arithmetic(family)
    for i, flags in enumerate([(), ("--in-memory",), ("--format", "orbax")]):
        code, err = run_ours(capsys, tmp_path, cfg, tmp_path / f"bar{i}", *flags)
        assert code == 0, err
        lines = err.rstrip("\n").split("\n")
        bars = [line for line in lines if "merging into" in line]
        assert len(bars) == 1 and lines[-1].startswith("wrote "), err
        final = bars[0].split("\r")[-1]  # tqdm redraws in place
        assert "100%" in final and re.search(r"B/s\]$", final) and "<" in final, final
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "quiet", "--quiet")
    assert code == 0 and err == "", err
    monkeypatch.setenv("DEM_JAX_QUIET", "1")
    code, err = run_ours(capsys, tmp_path, cfg, tmp_path / "env")
    assert code == 0 and err.startswith("wrote ") and err.count("\n") == 1, err


def test_bad_options_exit_2_with_one_line(capsys, family, tmp_path):
    bare = shutil.copytree(family[0], tmp_path / "bare")
    for f in bare.glob("tokenizer*"):
        f.unlink()
    cases = [
        ({"chat_template": "nope"}, (), "chat_template: 'nope' is neither"),
        ({"chat_template": "{{ short }}"}, (), "chat_template: '{{ short }}' is neither"),
        ({"chat_template": 3}, (), "chat_template: expected str"),
        ({"chat_template": "chatml"}, ("--no-copy-tokenizer",), "chat_template: --no-copy"),
        ({"chat_template": "chatml", "base_model": str(bare)}, (), "has no tokenizer"),
        ({}, ("--out-shard-size", "1.5B"), "--out-shard-size: cannot parse '1.5B'"),
        ({}, ("--out-shard-size", "5B", "--max-shard-size", "5GB"), "give one"),
        ({}, ("--random-seed", "-1"), "--seed: expected a non-negative integer"),
    ]
    for i, (change, flags, needle) in enumerate(cases):
        cfg = task_arithmetic(family, **change)
        code, err = run_ours(capsys, tmp_path, cfg, tmp_path / f"out{i}", *flags)
        lines = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert needle in lines[0], lines[0]
        if change:  # a YAML field: the message names the file
            assert f"out{i}.yaml" in lines[0], lines[0]
        assert not (tmp_path / f"out{i}").exists()
