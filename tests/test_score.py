"""Scoring: parity with transformers, padding = packing (the default), sharded = one
device, the CLI."""

import json
import math

import numpy as np
import pytest
from hf_models import save_hf_model

import dem_jax
from dem_jax import cli
from dem_jax.data.batches import encode_records
from dem_jax.data.tokenize import load_tokenizer
from dem_jax.search.score import score_model, score_rows

TEXT = [
    {"text": "w5 w7 w9 w11 w13"},
    {"text": "w20 w21 é w22"},  # "é" is <unk>: 2 UTF-8 bytes, one token
    {"text": "w3"},
    {"text": " ".join(f"w{i}" for i in range(30, 60))},
]
# 3 to 41 tokens each (BOS, words, EOS): at --seq-len 16 the 41- and 26-token records
# are split into pieces, and packed rows hold several of the short ones.
VARIED = [
    {"text": " ".join(f"w{i}" for i in range(start, start + n))}
    for start, n in ((5, 1), (10, 9), (20, 39), (7, 3), (60, 24), (4, 14), (30, 5))
]
PROMPT_COMPLETION = [
    {"prompt": "w40 w41 w42", "completion": "w43 w44"},
    {"prompt": "w50", "completion": "w51 w52 w53 w54"},
    {"prompt": "w60 w61", "completion": "w62"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    hf = save_hf_model("llama_gqa", root / "hf")
    write_jsonl(root / "text.jsonl", TEXT)
    write_jsonl(root / "pc.jsonl", PROMPT_COMPLETION)
    return root, hf


def main(argv):
    """Run the dem-jax CLI in process; returns its exit status."""
    return cli.main([str(a) for a in argv])


def torch_reference(hf_model, tokenizer, records, template="{prompt}"):
    """(summed NLL, loss tokens) with transformers: one record at a time, labels -100
    on BOS and the prompt, cross entropy summed over the shifted targets."""
    import torch

    total, count = 0.0, 0
    for r in records:
        ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        if "text" in r:
            context, target = [], ids(r["text"])
        else:
            context, target = ids(template.format(prompt=r["prompt"])), ids(r["completion"])
        seq = [tokenizer.bos_token_id, *context, *target, tokenizer.eos_token_id]
        labels = [-100] * (1 + len(context)) + [*target, tokenizer.eos_token_id]
        with torch.no_grad():
            logits = hf_model(torch.tensor([seq])).logits[0].double()
        nll = torch.nn.functional.cross_entropy(
            logits[:-1], torch.tensor(labels[1:]), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += sum(1 for x in labels[1:] if x != -100)
    return total, count


def test_score_matches_transformers(setup):
    root, hf = setup
    tokenizer = load_tokenizer(root / "hf")
    model = dem_jax.load_model(root / "hf")
    # batch 3 over 4 and 3 records: the last batch of each set is padded.
    scores = score_model(
        model, {"text": root / "text.jsonl", "pc": PROMPT_COMPLETION}, batch_size=3, seq_len=40
    )
    for name, records in (("text", TEXT), ("pc", PROMPT_COMPLETION)):
        want_nll, want_tokens = torch_reference(hf, tokenizer, records)
        s = scores[name]
        assert s.tokens == want_tokens
        np.testing.assert_allclose(s.nll_sum, want_nll, rtol=2e-5)
        np.testing.assert_allclose(s.perplexity, math.exp(want_nll / want_tokens), rtol=2e-5)
    # Bytes: UTF-8 of the text / the completion only ("é" is two bytes).
    assert scores["text"].bytes == sum(len(r["text"].encode()) for r in TEXT)
    assert scores["pc"].bytes == sum(len(r["completion"]) for r in PROMPT_COMPLETION)
    s = scores["pc"]
    assert s.bits_per_byte == pytest.approx(s.nll_sum / math.log(2) / s.bytes)


def test_packing_and_splitting_give_the_same_sums(setup):
    root, _ = setup
    model = dem_jax.load_model(root / "hf")
    data = {"text": TEXT}
    padded = score_model(model, data, batch_size=2, seq_len=64, packing=False)["text"]
    packed = score_model(model, data, batch_size=2, seq_len=64)["text"]  # the default
    assert padded.tokens == packed.tokens
    np.testing.assert_allclose(packed.nll_sum, padded.nll_sum, rtol=1e-5)
    # Shorter rows split the long record (its later pieces lose context), so the
    # sum changes but every target is still counted exactly once.
    split = score_model(model, data, batch_size=2, seq_len=8)["text"]
    assert split.tokens == padded.tokens and split.nll_sum != pytest.approx(padded.nll_sum)


def test_cli_packs_by_default_with_the_padded_sums_in_fewer_batches(
    setup, capsys, monkeypatch, tmp_path
):
    from dem_jax.search import score as score_lib

    root, _ = setup
    varied = write_jsonl(tmp_path / "varied.jsonl", VARIED)
    tokenizer = load_tokenizer(root / "hf")
    packed_rows = encode_records(VARIED, tokenizer, seq_len=16, packing=True).rows
    padded_rows = encode_records(VARIED, tokenizer, seq_len=16, packing=False).rows
    assert len(packed_rows) < len(padded_rows)
    # Count forward passes: every batch goes through the module's jitted _batch_nll.
    calls, real = [], score_lib._batch_nll
    monkeypatch.setattr(score_lib, "_batch_nll", lambda *a: calls.append(1) or real(*a))
    args = ["score", "--model", root / "hf", "--data", f"v={varied}"]
    args += ["--data", f"pc={root / 'pc.jsonl'}", "--seq-len", "16", "--batch-size", "2"]
    runs = {}
    for flag in ("", "--packing", "--no-packing"):
        calls.clear()
        assert main([*args, "--json", *([flag] if flag else [])]) == 0
        runs[flag] = json.loads(capsys.readouterr().out)["distributions"], len(calls)
    (packed, n_packed), (padded, n_padded) = runs[""], runs["--no-packing"]
    assert runs["--packing"][0] == packed  # the old flag is a no-op alias of the default
    assert n_packed < n_padded
    assert n_padded == math.ceil(len(padded_rows) / 2) + math.ceil(len(PROMPT_COMPLETION) / 2)
    # Every word and EOS is a loss token, in both modes, split records included.
    assert (
        packed["v"]["tokens"]
        == padded["v"]["tokens"]
        == sum(len(r["text"].split()) + 1 for r in VARIED)
    )
    for name in ("v", "pc"):
        assert packed[name]["tokens"] == padded[name]["tokens"]
        assert packed[name]["bytes"] == padded[name]["bytes"]
        for key in ("nll_sum", "perplexity", "bits_per_byte"):
            np.testing.assert_allclose(packed[name][key], padded[name][key], rtol=1e-5)


def test_sharded_scoring_equals_one_device(setup):
    root, _ = setup
    data = {"text": root / "text.jsonl", "pc": root / "pc.jsonl"}
    one = score_model(dem_jax.load_model(root / "hf"), data, batch_size=4, seq_len=16)
    mesh = dem_jax.make_mesh(data=1, fsdp=2, tensor=4)
    model = dem_jax.load_model(root / "hf", mesh=mesh)
    sharded = score_model(model, data, batch_size=4, seq_len=16, mesh=mesh)
    for name in data:
        assert sharded[name].tokens == one[name].tokens
        np.testing.assert_allclose(sharded[name].nll_sum, one[name].nll_sum, rtol=1e-5)


def test_progress_bar_reports_tokens_per_second(setup, capsys):
    root, _ = setup
    model = dem_jax.load_model(root / "hf")
    tokenizer = load_tokenizer(root / "hf")
    encoded = encode_records(TEXT * 3, tokenizer, seq_len=8)
    lines = []
    nll, tokens = score_rows(
        model.params, model.config, encoded.rows, 1, progress=lines.append, progress_every=4,
        name="t",
    )  # fmt: skip
    assert tokens == encoded.tokens and nll > 0
    err = capsys.readouterr().err
    assert "score t" in err and "tok/s" in err and f"{tokens}/{tokens}" in err, err
    assert lines == []  # one bar, not a line per batch


def test_cli_json_and_table(setup, capsys):
    root, _ = setup
    args = ["score", "--model", root / "hf", "--data", f"text={root / 'text.jsonl'}"]
    args += ["--data", f"pc={root / 'pc.jsonl'}", "--seq-len", "32", "--batch-size", "2"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = score_model(
        dem_jax.load_model(root / "hf"),
        {"text": TEXT, "pc": PROMPT_COMPLETION},
        batch_size=2,
        seq_len=32,
    )
    for name, s in want.items():
        got = out["distributions"][name]
        assert got["tokens"] == s.tokens
        np.testing.assert_allclose(got["mean_nll"], s.mean_nll, rtol=1e-6)
        np.testing.assert_allclose(got["bits_per_byte"], s.bits_per_byte, rtol=1e-6)
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["distribution", "tokens", "mean_nll", "perplexity", "bits/byte"]
    assert [line.split()[0] for line in table[1:]] == ["text", "pc"]


@pytest.mark.parametrize(
    "case",
    ["missing_file", "malformed_line", "no_equals", "empty_name", "duplicate", "batch_vs_mesh"],
)
def test_bad_input_exits_2_with_one_line(setup, capsys, tmp_path, case):
    root, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w5 w6"}\n{"text": oops}\n')
    data, extra, needle = f"a={root / 'text.jsonl'}", [], None
    if case == "missing_file":
        data, needle = f"a={tmp_path / 'nope.jsonl'}", f"{tmp_path / 'nope.jsonl'}: data file"
    elif case == "malformed_line":
        data, needle = f"a={bad}", f"{bad}:2: malformed JSON"
    elif case == "no_equals":
        data, needle = str(root / "text.jsonl"), "--data: expected NAME=FILE.jsonl"
    elif case == "empty_name":
        data, needle = f"={root / 'text.jsonl'}", "--data: expected NAME=FILE.jsonl"
    elif case == "duplicate":
        extra, needle = ["--data", data], "given twice"
    else:
        extra, needle = ["--mesh", "fsdp=2,tensor=4", "--batch-size", "3"], "--batch-size: 3"
    code = main(["score", "--model", root / "hf", "--data", data, *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dem-jax: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert needle in errors[0], errors[0]


def test_one_compile_for_every_batch_and_set(setup):
    from dem_jax.search import score as score_lib

    root, _ = setup
    model = dem_jax.load_model(root / "hf")
    before = score_lib._batch_nll._cache_size()
    # Sets of 4, 3 and 12 rows in batches of 5: every last batch is padded to 5 rows.
    data = {"a": TEXT, "b": PROMPT_COMPLETION, "c": TEXT * 3}
    scores = score_model(model, data, batch_size=5, seq_len=24, packing=False)
    assert score_lib._batch_nll._cache_size() - before == 1
    assert scores["c"].tokens == 3 * scores["a"].tokens
    np.testing.assert_allclose(scores["c"].nll_sum, 3 * scores["a"].nll_sum, rtol=1e-5)
