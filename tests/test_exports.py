"""What an exported or merged model directory holds, and that it is the same model in
every reader: transformers 5 (installed), transformers 4.57 (in a cached venv, see
``transformers4_python``) and dem-jax itself.

Files: config.json with both spellings of the rope and the bos / eos / pad ids,
generation_config.json (``generate()`` stops at EOS), tokenizer files with a sane
``model_max_length`` and the chat template, a model card, ``mergekit_config.yml``
for ``dem-jax merge``, and file modes like any other file's.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from hf_models import build_hf_model, save_tokenizer, torch_logits

import dem_jax
from dem_jax.io import model_card, storage
from dem_jax.io.figures import pyplot, save_figure
from dem_jax.merge.from_config import merge_from_config
from dem_jax.merge.registry import METHODS

ROPE_THETA = 500000.0
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
TOKENS = np.random.default_rng(0).integers(3, 101, (2, 13))
VERSION = metadata.version("dem-jax")


def save_source(directory: Path, seed: int = 0):
    """A transformers 5 Llama (rope in `rope_parameters` only) with a tokenizer and a
    chat template, as save_pretrained writes them."""
    # Weights large enough that attention, and so the rope, changes the logits visibly;
    # a copy of LLAMA3, which transformers fills in place.
    model = build_hf_model(
        "llama3_rope", seed, initializer_range=0.3, rope_theta=ROPE_THETA, rope_scaling=dict(LLAMA3)
    )
    model.save_pretrained(directory)
    save_tokenizer(directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return model


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    fields = model_card.parse_front_matter(text)
    assert fields is not None, text[:200]
    return fields, text


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """HF exports of one source model: converted (source config kept), from a config
    dem-jax wrote itself, and a streaming `dem-jax merge` (linear, 2 models)."""
    root = tmp_path_factory.mktemp("exports")
    src, src2 = root / "src", root / "src2"
    hf = save_source(src)
    save_source(src2, seed=1)
    model = dem_jax.load_model(src)
    dem_jax.save_model(model, root / "converted", format="hf")
    fresh = dem_jax.Model(model.config, model.params, hf_config=None, assets_dir=src)
    dem_jax.save_model(fresh, root / "fresh", format="hf")
    merge_yaml = (
        "# two seeds, averaged\n"
        "merge_method: linear\n"
        "models:\n"
        "  - model: src\n    parameters: {weight: 0.7}\n"
        "  - model: src2\n    parameters: {weight: 0.3}\n"
        "dtype: float32\n"
    )
    (root / "merge.yaml").write_text(merge_yaml)
    merge_from_config(root / "merge.yaml", root / "merged", format="hf")
    return {"root": root, "src": src, "hf": hf, "yaml": merge_yaml}


def test_config_has_both_rope_spellings_and_token_ids(exports):
    for name in ("converted", "fresh", "merged"):
        cfg = json.loads((exports["root"] / name / "config.json").read_text())
        assert cfg["rope_theta"] == ROPE_THETA, name
        assert cfg["rope_scaling"] == LLAMA3, name
        assert cfg["rope_parameters"] == {**LLAMA3, "rope_theta": ROPE_THETA}, name
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2), name  # <s>, </s>
        gen = json.loads((exports["root"] / name / "generation_config.json").read_text())
        assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2), name


def test_tokenizer_files_sane_and_chat_template_kept(exports):
    src = exports["src"]
    assert json.loads((src / "tokenizer_config.json").read_text())["model_max_length"] > 1e29
    for name in ("converted", "fresh", "merged"):
        out = exports["root"] / name
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
        assert (out / "chat_template.jinja").read_text() == TEMPLATE
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok.model_max_length == 64
        text = tok.apply_chat_template([{"role": "user", "content": "w5 w7"}], tokenize=False)
        assert text == "<s> w5 w7 </s> "


def test_chat_template_inside_tokenizer_config_kept(tmp_path):
    """The 4.x place for a template: a key of tokenizer_config.json."""
    src = tmp_path / "src"
    build_hf_model("llama_gqa").save_pretrained(src)
    save_tokenizer(src)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": TEMPLATE}))
    dem_jax.save_model(dem_jax.load_model(src), tmp_path / "out", format="hf")
    got = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert got["chat_template"] == TEMPLATE
    assert got["model_max_length"] == 64


def test_generate_stops_at_the_exported_eos(tmp_path):
    """The export's generation_config.json (written from config.json, the source has
    none) makes transformers' generate() stop at EOS: with EOS set to a token greedy
    decoding emits at step k, exactly k tokens come out instead of max_new_tokens."""
    src = tmp_path / "src"
    hf = build_hf_model("llama_gqa", initializer_range=0.3)
    hf.save_pretrained(src)
    (src / "generation_config.json").unlink()
    prompt = torch.tensor(TOKENS[:1, :5])
    free = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    new = free[0, 5:].tolist()
    assert len(new) == 8
    eos = next((t for t in new if t != new[0]), new[0])
    stop_at = new.index(eos) + 1
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))

    dem_jax.save_model(dem_jax.load_model(src), tmp_path / "out", format="hf")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    out = exported.generate(prompt, max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    assert out == new[:stop_at] and stop_at < 8


def test_merge_card_and_mergekit_config(exports, tmp_path):
    merged = exports["root"] / "merged"
    assert (merged / "mergekit_config.yml").read_text() == exports["yaml"]
    fields, text = card(merged)
    root = exports["root"]
    assert fields["base_model"] == [str(root / "src"), str(root / "src2")]
    assert fields["library_name"] == "transformers"
    assert fields["tags"] == ["dem-jax", "merge", "linear"]
    assert "Wortsman et al. 2022" in text and f"dem-jax {VERSION}" in text
    assert exports["yaml"].strip() in text

    # The same merge as a dem-jax directory: the same card, without library_name.
    merge_from_config(root / "merge.yaml", tmp_path / "orbax", format="orbax")
    assert (tmp_path / "orbax" / "mergekit_config.yml").read_text() == exports["yaml"]
    fields, _ = card(tmp_path / "orbax")
    assert "library_name" not in fields and fields["tags"][-1] == "linear"
    # ... which converted to HF keeps its provenance (card, YAML) and gains library_name.
    dem_jax.save_model(dem_jax.load_model(tmp_path / "orbax"), tmp_path / "hf", format="hf")
    fields, _ = card(tmp_path / "hf")
    assert fields["library_name"] == "transformers" and fields["tags"][-1] == "linear"
    assert (tmp_path / "hf" / "mergekit_config.yml").read_text() == exports["yaml"]


def test_data_aware_merge_card_and_mergekit_config(exports, tmp_path):
    """fisher runs in memory through merge.with_data: the same YAML and card."""
    root = exports["root"]
    (root / "a.jsonl").write_text("".join(f'{{"text": "w{i} w{i + 3} w9"}}\n' for i in (5, 7)))
    text = (
        "merge_method: fisher\n"
        "models:\n"
        "  - {model: src, data: a.jsonl}\n"
        "  - {model: src2, data: a.jsonl}\n"
        "seq_len: 8\nbatch_size: 2\n"
    )
    (root / "fisher.yaml").write_text(text)
    merge_from_config(root / "fisher.yaml", tmp_path / "out", format="hf")
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text
    fields, body = card(tmp_path / "out")
    assert fields["tags"] == ["dem-jax", "merge", "fisher"]
    assert "Matena & Raffel 2022" in body and text.strip() in body


def test_every_merge_method_has_its_paper():
    assert set(METHODS) <= set(model_card.PAPERS)
    assert "Ram et al. 2024" in model_card.method_line("dem")
    assert "Yadav et al. 2023" in model_card.method_line("ties")


def test_dem_model_card_names_omega(exports, tmp_path):
    """DEM's model (as the search writes it, then the pipeline's HF export)."""
    model = dem_jax.load_model(exports["src"])
    model.metadata = {
        "dem": {
            "base": str(exports["src"]),
            "distributions": ["math", "code"],
            "omega": {"math": 0.25, "code": 0.5},
            "objective": "mean_log_ppl",
            "objective_value": 1.5,
        }
    }
    dem_jax.save_model(model, tmp_path / "dem", format="orbax")
    dem_jax.save_model(dem_jax.load_model(tmp_path / "dem"), tmp_path / "dem-hf", format="hf")
    fields, text = card(tmp_path / "dem-hf")
    assert fields["tags"] == ["dem-jax", "merge", "dem"]
    assert fields["base_model"] == [str(exports["src"])]
    assert "Distribution Edited Model" in text and "Ram et al. 2024" in text
    body = text.split("### Settings\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(body)["omega"] == {"math": 0.25, "code": 0.5}


def test_conversion_card_or_the_source_readme(exports, tmp_path):
    fields, text = card(exports["root"] / "converted")
    assert fields["tags"] == ["dem-jax"] and fields["library_name"] == "transformers"
    assert f"Converted by dem-jax from `{exports['src']}`" in text
    own = tmp_path / "own"
    shutil.copytree(exports["src"], own)
    (own / "README.md").write_text("---\nlicense: mit\n---\n# The author's card\n")
    dem_jax.save_model(dem_jax.load_model(own), tmp_path / "mid", format="orbax")
    dem_jax.save_model(dem_jax.load_model(tmp_path / "mid"), tmp_path / "back", format="hf")
    for out in ("mid", "back"):
        assert (tmp_path / out / "README.md").read_bytes() == (own / "README.md").read_bytes()


def test_plots_and_reports_have_the_mode_of_other_outputs(exports, tmp_path):
    plt = pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    old = os.umask(0o027)  # not the usual 022: the mode must follow the umask
    try:
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        save_figure(fig, tmp_path / "plot.png")
        storage.write_text(tmp_path / "state.json", "{}\n")
        (tmp_path / "report.md").write_text("# report\n")
    finally:
        os.umask(old)
    modes = {p.name: mode(p) for p in tmp_path.iterdir()}
    assert modes == {"plot.png": 0o640, "state.json": 0o640, "report.md": 0o640}
    # Under this session's own umask: a plot like the files of an export.
    save_figure(plt.figure(), tmp_path / "again.png")
    export = exports["root"] / "converted"
    for name in ("config.json", "README.md", "generation_config.json"):
        assert mode(tmp_path / "again.png") == mode(export / name), name


# ------------------------------------------------------------------ transformers 4.57


def _venv_transformers(python: Path) -> str | None:
    """The transformers version the venv's python imports from its own site-packages."""
    if not python.is_file():
        return None
    # Found, not imported (that takes seconds): the version and where it would load from.
    code = (
        "import importlib.metadata as m, importlib.util as u; "
        "print(m.version('transformers'), u.find_spec('transformers').origin)"
    )
    got = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    if got.returncode != 0:
        return None
    version, where = got.stdout.split()
    return version if where.startswith(str(python.parent.parent)) else None


@pytest.fixture(scope="session")
def transformers4_python() -> Path:
    """The python of a venv with transformers 4.57 over this environment's packages
    (torch included), created once and cached in $DEM_JAX_TEST_CACHE (default
    ~/.cache/dem-jax-tests)/transformers4; skips when pip cannot install it."""
    cache = Path(os.environ.get("DEM_JAX_TEST_CACHE") or Path.home() / ".cache/dem-jax-tests")
    venv = cache / "transformers4"
    python = venv / "bin" / "python"
    if (_venv_transformers(python) or "").startswith("4.57"):
        return python
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".transformers4.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", tmp],
            check=True,
            capture_output=True,
            timeout=300,
        )
        pip = subprocess.run(
            [tmp / "bin" / "python", "-m", "pip", "install", "-q", *PIP_QUIET, TRANSFORMERS4],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if pip.returncode != 0:
            tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["?"]
            pytest.skip(f"cannot pip install {TRANSFORMERS4} into a venv: {tail[0]}")
        version = _venv_transformers(tmp / "bin" / "python")
        assert version is not None and version.startswith("4.57"), version
        shutil.rmtree(venv, ignore_errors=True)
        os.replace(tmp, venv)  # the venv's python finds its packages relative to itself
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert (_venv_transformers(python) or "").startswith("4.57")
    return python


TRANSFORMERS4 = "transformers==4.57.*"
PIP_QUIET = ("--disable-pip-version-check", "--no-input")
LOAD_SCRIPT = """
import json, sys
import numpy as np, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
tokens = torch.tensor(json.loads(sys.argv[1]))
out = {"version": transformers.__version__}
for d in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits.numpy()
    tok = AutoTokenizer.from_pretrained(d)
    out[d] = {
        "logits": logits.tolist(),
        "rope_theta": model.config.rope_theta,
        "ids": tok("w5 w7 hello")["input_ids"],
        "eos": GenerationConfig.from_pretrained(d).eos_token_id,
        "max_length": tok.model_max_length,
    }
json.dump(out, open(sys.argv[2], "w"))
"""


def test_exports_load_identically_in_transformers_4_57(exports, transformers4_python, tmp_path):
    root = exports["root"]
    # Teeth: the export as dem-jax wrote it before (rope in `rope_parameters` only).
    old = tmp_path / "old-style"
    shutil.copytree(root / "fresh", old)
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("rope_theta", None), cfg.pop("rope_scaling", None)
    (old / "config.json").write_text(json.dumps(cfg))
    dirs = [root / "converted", root / "fresh", root / "merged", old]

    (tmp_path / "load.py").write_text(LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    argv = [transformers4_python, tmp_path / "load.py", json.dumps(TOKENS.tolist())]
    run = subprocess.run(
        [*argv, tmp_path / "out.json", *dirs], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["version"].startswith("4.57")

    source_ids = transformers.AutoTokenizer.from_pretrained(exports["src"])("w5 w7 hello")
    for d in dirs[:3]:
        v4 = got[str(d)]
        logits4 = np.asarray(v4["logits"], np.float32)
        v5 = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        np.testing.assert_allclose(logits4, torch_logits(v5, TOKENS), rtol=0, atol=1e-5)
        ours = np.asarray(dem_jax.forward(dem_jax.load_model(d), TOKENS))
        np.testing.assert_allclose(logits4, ours, rtol=1e-4, atol=1e-4)
        assert v4["rope_theta"] == ROPE_THETA
        assert v4["ids"] == source_ids["input_ids"] and v4["eos"] == 2
        assert v4["max_length"] == 64
    # The source itself, read by transformers 5 and by dem-jax, is what was exported.
    np.testing.assert_allclose(
        got[str(root / "converted")]["logits"], torch_logits(exports["hf"], TOKENS), atol=1e-5
    )
    # The old-style file: transformers 5 still reads it right, 4.57 silently does not.
    v5_old = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(old).eval(), TOKENS)
    np.testing.assert_allclose(v5_old, got[str(root / "fresh")]["logits"], atol=1e-5)
    assert got[str(old)]["rope_theta"] == 10000.0
    gap = np.abs(
        np.asarray(got[str(old)]["logits"]) - np.asarray(got[str(root / "fresh")]["logits"])
    )
    assert gap.max() > 1e-2, gap.max()
