"""`dem-jax train` on bad input: exit status 2 and one line naming the problem."""

import pytest
from train_helpers import TINY

from dem_jax import cli


def train_error(capsys, *argv) -> str:
    code = cli.main(["train", str(TINY), *map(str, argv)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_malformed_jsonl_line(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    line = train_error(
        capsys,
        "--distribution",
        "text",
        f"output_dir={tmp_path}",
        f"data.distributions.text.train={data}",
    )
    assert f"{data}:3: malformed JSON" in line


def test_empty_distribution(capsys, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    line = train_error(
        capsys,
        "--distribution",
        "sort",
        f"output_dir={tmp_path}",
        f"data.distributions.sort.train={data}",
    )
    assert "empty.jsonl: no records" in line


def test_missing_tokenizer(capsys, tmp_path):
    line = train_error(
        capsys,
        "--distribution",
        "sort",
        f"output_dir={tmp_path}",
        f"data.tokenizer={tmp_path / 'nowhere'}",
    )
    assert "nowhere: no tokenizer files" in line


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.learning_rat=0.1", "tiny.yaml: train: unknown key 'learning_rat'"),
        ("model.init.hidden=3", "model.init: unknown key(s) hidden"),
        ("mesh.tensor=3", "mesh"),
    ],
)
def test_bad_config(capsys, tmp_path, override, needle):
    line = train_error(capsys, "--distribution", "sort", f"output_dir={tmp_path}", override)
    assert needle in line


def test_unknown_distribution(capsys, tmp_path):
    line = train_error(capsys, "--distribution", "poetry", f"output_dir={tmp_path}")
    assert "unknown distribution 'poetry'" in line and "arithmetic" in line


def test_missing_config_file(capsys, tmp_path):
    code = cli.main(["train", str(tmp_path / "nope.yaml"), "--mixture"])
    assert code == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
