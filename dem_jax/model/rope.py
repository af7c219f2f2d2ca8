"""Rotary position embeddings, with the frequency scalings the families use.

Frequencies follow Hugging Face's ``rope_init_fn``s exactly (computed in
float32 with numpy, as torch does) so logits match the reference models. RoPE
turns the first ``config.rotary_dim`` dimensions of each head (all of them but
for Phi's ``partial_rotary_factor``); Gemma 3's sliding-window layers use their
own base (``local_rope_theta``) and no scaling; Phi-3's longrope switches to its
long factors when a call's positions pass the pretraining length, as
transformers does per forward pass.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dem_jax.config.model import ModelConfig
from dem_jax.errors import DemError


def inverse_frequencies(config: ModelConfig, local: bool = False, long: bool = False) -> np.ndarray:
    """The (rotary_dim // 2,) float32 inverse frequencies after rope scaling; ``local``:
    of the sliding-window layers, ``long``: longrope's long factors."""
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if local and config.local_rope_theta is not None:
        return (1.0 / (np.float32(config.local_rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling.rope_type == "longrope":
        factors = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
        if factors.shape != exponents.shape:
            raise DemError(
                f"rope_scaling: longrope factors have {factors.size} entries, "
                f"expected {exponents.size} (rotary dim / 2)"
            )
        return (1.0 / (factors * np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if scaling.rope_type == "linear":
        # Position interpolation: positions / factor, i.e. frequencies / factor.
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: np.ndarray, s) -> np.ndarray:
    """Llama 3.1's piecewise scaling: long wavelengths divided by `factor`,
    short ones kept, and a smooth blend in between."""
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def longrope_attention_factor(config: ModelConfig) -> float:
    """longrope's cos/sin multiplier: as given, else sqrt(1 + ln s / ln L0) for the
    context extension s = max_position_embeddings / L0 (1 when s <= 1), as
    transformers' ``_compute_longrope_parameters`` does."""
    s = config.rope_scaling
    if s.attention_factor is not None:
        return float(s.attention_factor)
    original = s.original_max_position_embeddings
    factor = s.factor if s.factor != 1.0 else config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_tables(
    config: ModelConfig, positions: jnp.ndarray, local: bool = False
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables, each (B, T, rotary_dim) float32, for integer positions (B, T)."""
    inv_freq = jnp.asarray(inverse_frequencies(config, local))
    scale = 1.0
    if config.rope_scaling.rope_type == "longrope" and not (
        local and config.local_rope_theta is not None
    ):
        long = jnp.asarray(inverse_frequencies(config, local, long=True))
        # transformers picks the set from the call's longest position, for every row
        seq_len = jnp.max(positions) + 1
        original = config.rope_scaling.original_max_position_embeddings
        inv_freq = jnp.where(seq_len > original, long, inv_freq)
        scale = longrope_attention_factor(config)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, R/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, R)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the first R dims of x (B, T, N, Dh) by the tables (B, T, R), Hugging
    Face's rotate-half layout; the remaining Dh - R dims pass through."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    half = rot.shape[-1] // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(dtype)
