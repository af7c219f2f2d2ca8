"""dem-jax: Distribution Edited Models in JAX.

The public API is re-exported here; see :mod:`dem_jax.api`.
"""

__version__ = "0.1.0"

from dem_jax.api import forward
from dem_jax.config.model import ModelConfig, RopeScaling
from dem_jax.errors import DemError
from dem_jax.io.modeldir import Model
from dem_jax.io.models import init_model, load_model, save_model
from dem_jax.sharding.rules import make_mesh

__all__ = [
    "DemError",
    "Model",
    "ModelConfig",
    "RopeScaling",
    "forward",
    "init_model",
    "load_model",
    "make_mesh",
    "save_model",
]
