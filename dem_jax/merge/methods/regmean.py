"""RegMean: merging linear layers by regression on their inputs (Jin et al.,
*Dataless Knowledge Fusion by Merging Weights of Language Models*, ICLR 2023).

For a linear layer y = x W (W: (in, out)) with weights W_i in model i and
inputs X_i (rows = tokens of distribution i), the merge minimises
Σ_i ‖X_i W − X_i W_i‖², whose solution is

    W* = (Σ_i G_i)⁻¹ Σ_i G_i W_i,     G_i = X_iᵀ X_i.

RegMean shrinks the off-diagonal Gram entries, G̃ = α G + (1 − α) diag(G)
(α = 1: the exact regression; α = 0: a per-input-feature weighted average),
which the paper finds necessary for transformers. Every other parameter
(embeddings, norms, biases, a tied lm_head) is averaged.

In this layout (:mod:`dem_jax.model`) the linear layers and the inputs they see
are, per layer l (kernels have a leading layer axis; head axes are flattened so
each layer's kernel is a 2-D (in, out) matrix):

============================  ==========================  ===================
kernel                        input                        Gram key
============================  ==========================  ===================
attn.q_proj / k_proj / v_proj attention-norm output (D)    ``attn_in``
attn.o_proj                   attention output (H·Dh)      ``attn_out``
mlp.gate_proj / up_proj       mlp-norm output (D)          ``mlp_in``
mlp.down_proj                 silu(gate) ⊙ up (F)          ``mlp_hidden``
lm_head (untied only)         final-norm output (D)        ``final``
============================  ==========================  ===================

Gram matrices are sums over the non-padding tokens (segment id > 0, prompt
tokens included: every position is an input the layer processes), in float32;
:func:`regmean_merge` divides each by its token count by default (the mean
Gram, as RegMean's code does), so each distribution counts equally whatever
the size of its data. Memory: per distribution, (3 L D² + L (H·Dh)² + L F²)
floats — for a 7B Llama about 22 GB, dominated by the F×F ``mlp_hidden``; on a
mesh each Gram is sharded by its input dimension (:data:`GRAM_AXES`).

Whole-model use: ``dem-jax merge`` with ``merge_method: regmean`` (a dem-jax
extension of mergekit's YAML, see :mod:`dem_jax.merge.request`) and the
pipeline's ``regmean`` baseline, both through :mod:`dem_jax.merge.with_data`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dem_jax.errors import DemError
from dem_jax.lazy import LazyModule, jax, jnp, lazy_jit
from dem_jax.merge.method import DataMergeMethod, ParamSpec

# the model, flax and shardings only when statistics are computed
model_lib = LazyModule("dem_jax.model.transformer")
nnx = LazyModule("flax.nnx")
placement = LazyModule("dem_jax.sharding.placement")
rules = LazyModule("dem_jax.sharding.rules")

if TYPE_CHECKING:
    from jax.sharding import Mesh, NamedSharding

DEFAULT_ALPHA = 0.9  # the paper's off-diagonal scale
DEFAULT_RIDGE = 1e-6  # relative to the Gram diagonal
_HI = "highest"  # no TF32/bf16 passes for Gram sums and solves

# Parameter path (without the trailing "kernel") -> Gram key of its input.
LINEAR_INPUTS: dict[tuple[str, ...], str] = {
    ("layers", "attn", "q_proj"): "attn_in",
    ("layers", "attn", "k_proj"): "attn_in",
    ("layers", "attn", "v_proj"): "attn_in",
    ("layers", "attn", "qkv_proj"): "attn_in",  # Phi-3's fused q/k/v
    ("layers", "attn", "o_proj"): "attn_out",
    ("layers", "mlp", "gate_proj"): "mlp_in",
    ("layers", "mlp", "up_proj"): "mlp_in",
    ("layers", "mlp", "gate_up_proj"): "mlp_in",  # Phi-3's fused gate/up
    ("layers", "mlp", "down_proj"): "mlp_hidden",
    ("lm_head",): "final",
}


def _gram(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Σ_t w_t x_t x_tᵀ over tokens: x (B, T, *in), weight (B, T) -> (Din, Din)."""
    x = x.astype(jnp.float32).reshape(x.shape[0] * x.shape[1], -1)  # (B·T, Din), heads flattened
    w = weight.reshape(-1, 1)
    return jnp.einsum("ni,nj->ij", x * w, x, precision=_HI)


class _Tap:
    """Stands in for a Dense: records the input it is called with, then calls it."""

    def __init__(self, dense, sink: dict, key: str):
        self.dense, self.sink, self.key = dense, sink, key

    def __call__(self, x):
        self.sink[self.key] = x
        return self.dense(x)


def _gram_batch(params, config, batch) -> dict[str, jax.Array]:
    """Gram sums of every linear layer's input on one (B, T) batch, and its token count.

    The forward pass is the model's own: :func:`dem_jax.model.transformer.bind` gives the NNX
    modules, each layer runs ``Block.__call__`` (norms, RoPE, masked attention,
    SwiGLU), and the four Dense modules whose inputs are needed are wrapped in
    :class:`_Tap` for the call, so no attention or MLP math is re-implemented
    here. Only the outer loop (embedding, the layer scan with its per-layer
    sliding window, the final norm) is spelled out, as in ``DecoderLM``; the
    embedding and the rope tables come from ``DecoderLM.embed_inputs`` itself.
    """
    c = config
    model = model_lib.bind(c, params)
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    weight = (segments > 0).astype(jnp.float32)  # padding (segment 0) is not data
    x, cos, sin, _ = model.embed_inputs(tokens, positions, segments)
    graphdef, state = nnx.split(model.layers)
    windows = model_lib.layer_windows(c)
    kinds = model_lib.rope_kinds(windows, cos.shape[0])

    def layer(x, scanned):
        layer_state, window, kind = scanned
        block = nnx.merge(graphdef, layer_state)
        taps: dict[str, jax.Array] = {}
        # q/k/v share one input, gate/up another: one tap each is enough.
        qkv = "qkv_proj" if c.fused_qkv else "q_proj"
        gate = "gate_up_proj" if c.fused_gate_up else "gate_proj"
        setattr(block.attn, qkv, _Tap(getattr(block.attn, qkv), taps, "attn_in"))
        block.attn.o_proj = _Tap(block.attn.o_proj, taps, "attn_out")
        setattr(block.mlp, gate, _Tap(getattr(block.mlp, gate), taps, "mlp_in"))
        block.mlp.down_proj = _Tap(block.mlp.down_proj, taps, "mlp_hidden")
        x = block(x, cos[kind], sin[kind], model_lib.attention_mask(segments, window))
        return x, {k: _gram(v, weight) for k, v in taps.items()}

    x, grams = jax.lax.scan(layer, x, (state, windows, kinds))  # each (L, Din, Din)
    if not c.tie_embeddings:
        grams["final"] = _gram(model.final_norm(x), weight)
    grams["tokens"] = jnp.sum(weight)
    return grams


# Logical axes of each Gram (Din × Din per layer), so on a mesh a Gram is sharded like
# the kernels that read its input: rows over the mesh axis of the input dimension.
GRAM_AXES: dict[str, tuple[str, ...]] = {
    "attn_in": ("layers", "embed", "embed"),
    "attn_out": ("layers", "heads", "heads"),
    "mlp_in": ("layers", "embed", "embed"),
    "mlp_hidden": ("layers", "mlp", "mlp"),
    "final": ("embed", "embed"),
    "tokens": (),
}


def gram_shardings(config, mesh: Mesh) -> dict[str, NamedSharding]:
    """Where each Gram of :func:`gram_matrices` lives on ``mesh`` (see :data:`GRAM_AXES`)."""
    c = config
    d, hd, f, n = c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size, c.num_layers
    shapes = {"attn_in": (n, d, d), "attn_out": (n, hd, hd), "mlp_in": (n, d, d)}
    shapes.update(mlp_hidden=(n, f, f), tokens=())
    if not c.tie_embeddings:
        shapes["final"] = (d, d)
    structs = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    return rules.tree_shardings({k: GRAM_AXES[k] for k in structs}, structs, mesh)


@functools.lru_cache(maxsize=16)
def _gram_fn(config, mesh: Mesh | None):
    """The jitted batch pass; on a mesh its Grams come out as :func:`gram_shardings` says."""
    fn = functools.partial(_gram_batch, config=config)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=gram_shardings(config, mesh))


def gram_matrices(
    params: Any, config, batches: Iterable[Mapping[str, Any]], mesh: Mesh | None = None
) -> dict[str, Any]:
    """Input Gram matrices of every linear layer of one model over ``batches``.

    Returns ``{"attn_in": (L, D, D), "attn_out": (L, H·Dh, H·Dh), "mlp_in": (L, D, D),
    "mlp_hidden": (L, F, F), "final": (D, D) (untied lm_head only), "tokens": ()}``:
    G = Σ_t x_t x_tᵀ over the batches' non-padding tokens (float32 sums) and
    the number of those tokens. Pass one such dict per fine-tuned model (each
    computed on its own distribution's data, with its own parameters) to
    :func:`regmean_merge`.

    With ``mesh`` the parameters are placed on
    :func:`~dem_jax.sharding.rules.param_shardings`, each batch is split over the
    data-parallel axes (the batch size must divide by data*fsdp*expert) and the Grams
    come back sharded (:func:`gram_shardings`); the numbers are those of the
    single-device pass up to summation order.
    """
    if config.num_experts:
        # an expert's input Gram would count only the tokens routed to it
        raise DemError("regmean: mixture-of-experts models are not supported (use fisher or ties)")
    fn = _gram_fn(config, mesh)
    params = placement.place_params(params, config, mesh)
    total = None
    for batch in batches:
        if mesh is not None:
            placement.check_batch_size(len(batch["tokens"]), mesh, "batch size")
        part = fn(params, batch=placement.place_batch(batch, mesh))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    if total is None or float(total["tokens"]) == 0:
        raise DemError("gram_matrices: no tokens in the batches")
    return total


def reduce_off_diagonal(gram: jax.Array, alpha: float) -> jax.Array:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries scaled by α, diagonal kept."""
    eye = jnp.eye(gram.shape[-1], dtype=bool)
    return jnp.where(eye, gram, alpha * gram)


@lazy_jit
def regmean_linear(
    kernels: jax.Array, grams: jax.Array, alpha=DEFAULT_ALPHA, ridge=0.0
) -> jax.Array:
    """RegMean of one linear layer: kernels (N, Din, Dout), input Grams (N, Din, Din).

        W* = (Σ_i G̃_i + ε I)⁻¹ (Σ_i G̃_i W_i + ε W̄),   ε = ridge · mean(diag Σ_i G̃_i)

    with W̄ the plain mean of the W_i. ridge = 0 is RegMean exactly (and with
    α = 1 the least-squares solution of min Σ_i ‖X_i W − X_i W_i‖²). ridge > 0
    adds ε ‖W − W̄‖² to that objective: an input feature no distribution
    exercises (zero row and column in every Gram) has undetermined weights,
    and the ridge sets them to the average instead of NaN. float32 result.
    """
    g = reduce_off_diagonal(grams.astype(jnp.float32), alpha)
    kernels = kernels.astype(jnp.float32)
    lhs = jnp.sum(g, axis=0)
    rhs = jnp.einsum("nij,njo->io", g, kernels, precision=_HI)
    eps = ridge * jnp.mean(jnp.diagonal(lhs))
    lhs = lhs + eps * jnp.eye(lhs.shape[0], dtype=lhs.dtype)
    rhs = rhs + eps * jnp.mean(kernels, axis=0)
    return jnp.linalg.solve(lhs, rhs)


def _merge_kernel(kernels: list, grams: list, stacked: bool, alpha, ridge) -> jax.Array:
    """RegMean of one kernel leaf; per layer when ``stacked`` (leading L axis)."""
    shape = kernels[0].shape
    din = grams[0].shape[-1]
    lead = shape[:1] if stacked else ()
    w = jnp.stack([k.reshape(*lead, din, -1) for k in kernels])  # (N, [L,] Din, Dout)
    g = jnp.stack(grams)  # (N, [L,] Din, Din)
    if not stacked:
        return regmean_linear(w, g, alpha, ridge).reshape(shape)
    # One layer at a time keeps the solve's temporaries to one layer's size.
    per_layer = jax.lax.map(
        lambda wg: regmean_linear(wg[0], wg[1], alpha, ridge),
        (jnp.moveaxis(w, 1, 0), jnp.moveaxis(g, 1, 0)),
    )
    return per_layer.reshape(shape)


def regmean_merge(
    params_list: Sequence[Any],
    grams: Sequence[Mapping[str, Any]],
    alpha: float = DEFAULT_ALPHA,
    ridge: float = DEFAULT_RIDGE,
    normalize: bool = True,
) -> Any:
    """RegMean merge of N models with the same architecture; float32 parameters.

    Every kernel in :data:`LINEAR_INPUTS` is merged per layer by
    :func:`regmean_linear` with the Grams of its input (``grams[i]`` from
    :func:`gram_matrices` of model i on distribution i); every other parameter
    (embeddings, norms, biases, a tied lm_head) is the plain mean. With
    ``normalize`` each model's Grams are divided by its token count first (mean
    Gram per token), so a distribution with more tokens does not dominate;
    ``normalize=False`` uses the sums (every token counts equally). ``alpha``
    is the off-diagonal scale (α = 1: exact regression); ``ridge`` is relative
    to the Gram diagonal (see :func:`regmean_linear`). One jitted program for
    the whole tree; to stream a large model leaf by leaf, call
    :func:`regmean_linear` per kernel instead.
    """
    n = len(params_list)
    if n == 0 or len(grams) != n:
        raise DemError(f"regmean_merge: {n} models and {len(grams)} Gram sets")
    if not 0.0 <= alpha <= 1.0:
        raise DemError(f"regmean_merge: alpha must be in [0, 1], got {alpha}")
    needed = {s for s in map(_site, _leaf_paths(params_list[0])) if s is not None}
    for i, g in enumerate(grams):
        if not needed <= set(g) or "tokens" not in g:
            missing = sorted((needed | {"tokens"}) - set(g))
            raise DemError(f"regmean_merge: Gram(s) {missing} missing for model {i}")
    # Only what the merge reads goes into the jitted call (not, e.g., an unused "final").
    used = [{k: g[k] for k in (*needed, "tokens")} for g in grams]
    return _regmean_tree(list(params_list), used, alpha, ridge, normalize)


def _leaf_paths(params) -> list[tuple[str, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [tuple(p.key for p in path) for path, _ in flat]


def _site(keys: tuple[str, ...]) -> str | None:
    """The Gram key of a kernel's input, or None for a parameter that is averaged."""
    return LINEAR_INPUTS.get(keys[:-1]) if keys[-1] == "kernel" else None


@lazy_jit(static_argnums=4)
def _regmean_tree(params_list, grams, alpha, ridge, normalize):
    def scaled(g, key):
        return g[key] / g["tokens"] if normalize else g[key]

    def merge_leaf(path, *leaves):
        keys = tuple(p.key for p in path)
        site = _site(keys)
        if site is None:
            return jnp.mean(jnp.stack([x.astype(jnp.float32) for x in leaves]), axis=0)
        site_grams = [scaled(g, site) for g in grams]
        return _merge_kernel(list(leaves), site_grams, keys[0] == "layers", alpha, ridge)

    return jax.tree_util.tree_map_with_path(merge_leaf, *params_list)


@dataclass(frozen=True, kw_only=True)
class RegMean(DataMergeMethod):
    """RegMean over the fine-tunes (dem-jax extension of MERGE.yaml)."""

    def merge_models(self, params_list, config, batches, mesh, per_model, shared):
        """Each model's input Grams on its own data, then each linear layer solved."""
        pairs = zip(params_list, batches, strict=True)
        grams = [gram_matrices(p, config, b, mesh=mesh) for p, b in pairs]
        return regmean_merge(params_list, grams, alpha=shared["alpha"], ridge=shared["ridge"])


METHODS = (
    RegMean(
        name="regmean",
        params=(
            ParamSpec("alpha", float, False, DEFAULT_ALPHA, 0.0, 1.0),
            ParamSpec("ridge", float, False, DEFAULT_RIDGE, 0.0),
        ),
    ),
)
