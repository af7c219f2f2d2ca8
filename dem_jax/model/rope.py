"""Rotary position embeddings, with the frequency scalings Llama models use.

Frequencies follow Hugging Face's ``rope_init_fn``s exactly (computed in
float32 with numpy, as torch does) so logits match the reference models.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dem_jax.config.model import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """The (head_dim // 2,) float32 inverse frequencies after rope scaling."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
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


def rope_tables(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables, each (B, T, head_dim) float32, for integer positions (B, T)."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, Dh/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, Dh)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x (B, T, N, Dh) by the tables (B, T, Dh), Hugging Face's rotate-half layout."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(dtype)
