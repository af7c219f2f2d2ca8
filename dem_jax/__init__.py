"""dem-jax: Distribution Edited Models in JAX."""

__version__ = "0.1.0"
