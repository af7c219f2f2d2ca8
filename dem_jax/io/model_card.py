"""Model cards: the README.md of every model dem-jax writes, as mergekit writes one.

A card is YAML front matter (``base_model``, ``tags``, and ``library_name:
transformers`` for a Hugging Face directory) and a short Markdown body: the merge
method with its paper, the input models, the exact MERGE.yaml or DEM's chosen ω,
and the dem-jax version. Everything here is a pure function from provenance
(``Model.metadata``) to text; :mod:`dem_jax.io.assets` writes the file.

    card = card_from_metadata({"merge": {"method": "ties", ...}}, fmt="hf", version="0.1.0")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Paper:
    """Where a merge method comes from."""

    cite: str  # "Yadav et al. 2023"
    title: str
    url: str | None = None


_TASK_ARITHMETIC = Paper(
    "Ilharco et al. 2023", "Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089"
)
_DARE = Paper(
    "Yu et al. 2024",
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    "https://arxiv.org/abs/2311.03099",
)
_BREADCRUMBS = Paper(
    "Davari & Belilovsky 2024",
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    "https://arxiv.org/abs/2312.06795",
)
_DELLA = Paper(
    "Deep et al. 2024",
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    "https://arxiv.org/abs/2406.11617",
)
_SOUPS = Paper(
    "Wortsman et al. 2022",
    "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
    "increasing inference time",
    "https://arxiv.org/abs/2203.05482",
)
_RAM = Paper("arXiv:2601.13572", "Reinforced Agent Merging", "https://arxiv.org/abs/2601.13572")

# Merge method (dem_jax.merge.methods' names) -> its paper.
PAPERS: dict[str, Paper] = {
    "task_arithmetic": _TASK_ARITHMETIC,
    "dem": Paper(
        "Ram et al. 2024 (EMNLP)",
        "DEM: Distribution Edited Model for Training with Mixed Data Distributions",
        "https://arxiv.org/abs/2406.15570",
    ),
    "ties": Paper(
        "Yadav et al. 2023",
        "TIES-Merging: Resolving Interference When Merging Models",
        "https://arxiv.org/abs/2306.01708",
    ),
    "dare_ties": _DARE,
    "dare_linear": _DARE,
    "breadcrumbs": _BREADCRUMBS,
    "breadcrumbs_ties": _BREADCRUMBS,
    "della": _DELLA,
    "della_linear": _DELLA,
    "linear": _SOUPS,
    "slerp": Paper(
        "Shoemake 1985",
        "Animating Rotation with Quaternion Curves",
        "https://en.wikipedia.org/wiki/Slerp",
    ),
    "model_stock": Paper(
        "Jang et al. 2024",
        "Model Stock: All we need is just a few fine-tuned models",
        "https://arxiv.org/abs/2403.19522",
    ),
    "nuslerp": Paper("mergekit (Arcee AI)", "NuSLERP", "https://github.com/arcee-ai/mergekit"),
    "multislerp": Paper(
        "Goddard 2025",
        "Multi-SLERP",
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    "karcher": Paper("arXiv:2603.04972", "Karcher Mean", "https://arxiv.org/abs/2603.04972"),
    "sce": Paper(
        "Wan et al. 2024",
        "FuseChat: Knowledge Fusion of Chat Models",
        "https://arxiv.org/abs/2408.07990",
    ),
    "nearswap": Paper(
        "alchemonaut 2024",
        "NearSwap",
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    "arcee_fusion": Paper("Arcee AI", "Arcee Fusion", "https://arcee.ai"),
    "passthrough": Paper(
        "mergekit (Arcee AI)", "Passthrough", "https://github.com/arcee-ai/mergekit"
    ),
    "ram": _RAM,
    "ramplus_tl": _RAM,
    "parameter_selection": Paper(
        "Ju et al. 2024", "parameter-selection merging (each element from a random model)"
    ),
    "fisher": Paper(
        "Matena & Raffel 2022",
        "Merging Models with Fisher-Weighted Averaging",
        "https://arxiv.org/abs/2111.09832",
    ),
    "regmean": Paper(
        "Jin et al. 2023",
        "Dataless Knowledge Fusion by Merging Weights of Language Models",
        "https://arxiv.org/abs/2212.09849",
    ),
}
# Pipeline baselines named apart from the method they run.
_BASELINE_METHODS = {"uniform_soup": "linear"}


def front_matter(fields: dict[str, Any]) -> str:
    """``---`` / YAML / ``---``, the block the Hugging Face Hub reads a card's metadata from."""
    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """The YAML front matter of a card, or None when it has none (or it is not a mapping)."""
    if not text.startswith("---\n"):
        return None
    end = text.find("\n---\n", 3)
    if end < 0:
        return None
    try:
        data = yaml.safe_load(text[4 : end + 1])
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def is_dem_jax_card(text: str) -> bool:
    """Whether a README.md is a card dem-jax wrote (its tags say so)."""
    fields = parse_front_matter(text) or {}
    tags = fields.get("tags")
    return isinstance(tags, list) and "dem-jax" in tags


def _fields(fmt: str, tags: list[str], base_models: list[str] | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if base_models:
        fields["base_model"] = list(dict.fromkeys(base_models))
    if fmt == "hf":
        fields["library_name"] = "transformers"
    fields["tags"] = tags
    return fields


def _loading(fmt: str) -> str:
    if fmt == "hf":
        return (
            "A Hugging Face model directory: `AutoModelForCausalLM.from_pretrained(path)` "
            "loads it with transformers 4.57+ or 5.x."
        )
    return "A dem-jax model directory (Orbax parameters): load it with `dem_jax.load_model(path)`."


def _footer(version: str) -> str:
    return f"\nWritten by dem-jax {version}.\n"


def method_line(method: str) -> str:
    """``method`` (the name in MERGE.yaml) with its paper, as a Markdown sentence."""
    paper = PAPERS.get(method)
    if paper is None:
        return f"Merge method: `{method}`."
    title = f"[{paper.title}]({paper.url})" if paper.url else paper.title
    return f"Merge method: `{method}` ({paper.cite}, {title})."


def _yaml_block(data: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "```\n"


def merge_card(
    method: str,
    base: str | None,
    models: list[str],
    *,
    fmt: str,
    version: str,
    config_yaml: str | None = None,
    settings: dict[str, Any] | None = None,
    title: str = "Merged model",
    inputs_label: str = "Models merged",
    base_models: list[str] | None = None,
) -> str:
    """The card of a merge: front matter, the method and its paper, the base and the
    inputs, then the exact MERGE.yaml (``config_yaml``) and/or other ``settings``.

    ``base_models`` (the front matter's ``base_model``) defaults to the base and the
    inputs, as mergekit lists them.
    """
    if base_models is None:
        base_models = [m for m in [base, *models] if m]
    fields = _fields(fmt, ["dem-jax", "merge", method], base_models)
    lines = [front_matter(fields), f"# {title}\n", _loading(fmt) + "\n"]
    lines += ["## Merge details\n", method_line(method) + "\n"]
    if base:
        lines.append(f"Base model: `{base}`.\n")
    if models:
        lines.append(f"### {inputs_label}\n")
        lines.append("".join(f"* `{m}`\n" for m in models))
    if config_yaml is not None:
        lines.append("### Configuration\n")
        lines.append(
            "The following YAML configuration (also saved as `mergekit_config.yml`) "
            "produced this model:\n"
        )
        lines.append("```yaml\n" + config_yaml.rstrip("\n") + "\n```\n")
    if settings:
        lines.append("### Settings\n")
        lines.append(_yaml_block(settings))
    return "\n".join(lines) + _footer(version)


def dem_card(dem: dict[str, Any], *, fmt: str, version: str) -> str:
    """The card of DEM's merged model Θ + Σ ω_i ΔΘ_i with the ω its weight search chose."""
    omega = dem.get("omega") or {}
    settings = {
        k: dem[k] for k in ("omega", "objective", "objective_value") if dem.get(k) is not None
    }
    base = dem.get("base")
    return merge_card(
        "dem",
        base,
        list(dem.get("distributions") or omega),
        fmt=fmt,
        version=version,
        settings=settings,
        title="Distribution Edited Model (DEM)",
        inputs_label="Distribution vectors (ω chosen by validation perplexity)",
        base_models=[base] if base else [],
    )


def training_card(meta: dict[str, Any], *, fmt: str, version: str) -> str:
    """The card of a model dem-jax fine-tuned (one distribution, or a data mixture)."""
    names = meta.get("trained_on") or []
    lines = [front_matter(_fields(fmt, ["dem-jax", "fine-tune"])), "# Fine-tuned model\n"]
    lines.append(_loading(fmt) + "\n")
    lines.append(f"Fine-tuned with dem-jax for {meta.get('steps')} steps on: ")
    lines.append(", ".join(f"`{n}`" for n in names) + ".\n")
    if meta.get("mixture"):
        lines.append("Mixture proportions:\n")
        lines.append(_yaml_block(meta["mixture"]))
    return "\n".join(lines) + _footer(version)


def conversion_card(source: str | None, *, fmt: str, version: str) -> str:
    """The card of a model converted between formats (or created by dem-jax)."""
    lines = [front_matter(_fields(fmt, ["dem-jax"])), "# Model\n", _loading(fmt) + "\n"]
    if source is not None:
        lines.append(f"Converted by dem-jax from `{source}`.\n")
    else:
        lines.append("Written by dem-jax; no source model is recorded.\n")
    return "\n".join(lines) + _footer(version)


def card_from_metadata(metadata: dict[str, Any], *, fmt: str, version: str) -> str | None:
    """The card a model's provenance calls for, or None when it records none (a
    plain conversion). ``fmt`` is ``"hf"`` or ``"orbax"``."""
    merge = metadata.get("merge") if isinstance(metadata.get("merge"), dict) else None
    if isinstance(metadata.get("dem"), dict):
        return dem_card(metadata["dem"], fmt=fmt, version=version)
    if "baseline" in metadata:
        name = str(metadata["baseline"])
        method = (merge or {}).get("method") or _BASELINE_METHODS.get(name, name)
        info = {k: v for k, v in metadata.items() if k not in ("baseline", "merge")}
        return merge_card(
            method,
            (merge or {}).get("base"),
            list((merge or {}).get("models") or []),
            fmt=fmt,
            version=version,
            settings=info or None,
            title=f"DEM pipeline baseline: {name}",
        )
    if merge is not None:
        extra = {k: merge[k] for k in ("parameters", "data", "seed") if merge.get(k) is not None}
        return merge_card(
            str(merge.get("method")),
            merge.get("base"),
            list(merge.get("models") or []),
            fmt=fmt,
            version=version,
            config_yaml=merge.get("config_yaml"),
            settings=None if merge.get("config_yaml") else extra or None,
        )
    if "trained_on" in metadata:
        return training_card(metadata, fmt=fmt, version=version)
    return None
