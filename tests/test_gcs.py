"""gs:// paths end to end against a local fake GCS server: model directories in
both formats, vectors, merges, and whole CLI runs with every path on GCS."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from fake_gcs import bucket, gcs_server, list_objects  # noqa: F401  (fixtures)
from hf_models import save_hf_model
from train_helpers import run_cli

import dem_jax
from dem_jax.errors import DemError
from dem_jax.io import storage
from dem_jax.io.modeldir import model_format
from dem_jax.sharding.rules import make_mesh


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(model.params)]


def test_model_directories_round_trip_on_gcs(tmp_path, bucket):  # noqa: F811
    """HF and dem-jax directories written to gs:// (sharded safetensors, Orbax on a mesh)
    load back bit-identical, from GCS and with each host reading only its blocks."""
    save_hf_model("llama_gqa", tmp_path / "hf")
    local = dem_jax.load_model(tmp_path / "hf")
    mesh = make_mesh(fsdp=2, tensor=4)
    dem_jax.save_model(local, f"{bucket}/hf", format="hf", max_shard_bytes=20_000)
    dem_jax.save_model(local, f"{bucket}/orbax", format="orbax")
    for fmt in ("hf", "orbax"):
        remote = dem_jax.load_model(f"{bucket}/{fmt}", mesh=mesh)
        for a, b in zip(_leaves(local), _leaves(remote), strict=True):
            np.testing.assert_array_equal(a, b)
    names = list_objects(bucket)
    assert "hf/model.safetensors.index.json" in names and "hf/tokenizer.json" in names
    assert "orbax/dem_jax_model.json" in names
    assert not [n for n in names if ".tmp-" in n or ".partial" in n or "incomplete" in n]
    # the HF export from GCS loads in transformers with the original tensors
    import transformers

    copy = storage.local_copy(f"{bucket}/hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(copy)
    ours = save_hf_model("llama_gqa", tmp_path / "again")
    for (k, v), (k2, v2) in zip(
        theirs.state_dict().items(), ours.state_dict().items(), strict=True
    ):
        assert k == k2
        np.testing.assert_array_equal(v.numpy(), v2.numpy())


def test_existing_output_and_interrupted_move_are_refused(tmp_path, bucket):  # noqa: F811
    save_hf_model("llama_mha", tmp_path / "hf")
    model = dem_jax.load_model(tmp_path / "hf")
    dem_jax.save_model(model, f"{bucket}/m", format="orbax")
    with pytest.raises(DemError, match="already exists"):
        dem_jax.save_model(model, f"{bucket}/m", format="orbax")
    dem_jax.save_model(model, f"{bucket}/m", format="hf", overwrite=True)  # replaces it
    assert model_format(f"{bucket}/m") == "hf"
    assert not [n for n in list_objects(f"{bucket}/m") if n.startswith("params")]  # old gone
    from etils import epath

    (epath.Path(f"{bucket}/m") / ".dem_jax_incomplete").write_text("")
    with pytest.raises(DemError, match="incomplete output"):
        dem_jax.load_model(f"{bucket}/m")


def _upload_dir(local: Path, url: str) -> None:
    for f in local.iterdir():
        if f.is_file():
            storage.copy_file(f, f"{url}/{f.name}")


def test_pipeline_with_every_path_on_gcs_equals_local(tmp_path, bucket):  # noqa: F811
    """`dem-jax pipeline` with output_dir, data and tokenizer on gs://: fine-tunes,
    vectors, search, baselines, a mixture, report and HF export all land on GCS,
    with the same numbers as the same run on local disk, and no temporaries left."""
    from test_pipeline import TINY_DATA, mini_config

    cfg = yaml.safe_load(mini_config(tmp_path / "local").read_text())
    cfg["pipeline"].update(pretrain={"steps": 0}, mixtures=["uniform"])
    cfg["pipeline"]["baselines"] = ["task_arithmetic", "regmean"]
    local_yaml = tmp_path / "local.yaml"
    local_yaml.write_text(yaml.safe_dump(cfg))

    _upload_dir(TINY_DATA / "tokenizer", f"{bucket}/tokenizer")
    for split in cfg["data"]["distributions"].values():
        for key, path in split.items():
            remote = f"{bucket}/data/{Path(path).name}"
            storage.copy_file(path, remote)
            split[key] = remote
    cfg["data"]["tokenizer"] = f"{bucket}/tokenizer"
    cfg["output_dir"] = f"{bucket}/run"
    gcs_yaml = tmp_path / "gcs.yaml"
    gcs_yaml.write_text(yaml.safe_dump(cfg))

    reports = {}
    for name, config in (("local", local_yaml), ("gcs", gcs_yaml)):
        done = run_cli("pipeline", config)
        assert done.returncode == 0, done.stderr[-4000:]
        root = storage.path(yaml.safe_load(config.read_text())["output_dir"])
        reports[name] = json.loads((root / "report" / "report.json").read_text())

    local, remote = reports["local"]["models"], reports["gcs"]["models"]
    assert sorted(local) == sorted(remote)
    for model in local:
        for dist, numbers in local[model]["eval"].items():
            assert remote[model]["eval"][dist]["nll"] == pytest.approx(numbers["nll"], rel=1e-6)
    names = list_objects(f"{bucket}/run")
    for expected in ("models/dem-hf/config.json", "report/report.md", "search/chosen.json"):
        assert expected in names
    assert any(n.startswith("logs/") for n in names)
    assert not [n for n in names if ".tmp-" in n or ".partial" in n or "incomplete" in n]
    exported = dem_jax.load_model(f"{bucket}/run/models/dem-hf")
    dem = dem_jax.load_model(f"{bucket}/run/models/dem")
    for a, b in zip(_leaves(exported), _leaves(dem), strict=True):
        np.testing.assert_allclose(a, b.astype(a.dtype))
