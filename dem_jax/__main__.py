"""``python -m dem_jax`` is the same as the ``dem-jax`` command."""

import sys

from dem_jax.cli import main

sys.exit(main())
