"""The merge methods, one module each (a family may share one): every module defines
``METHODS``, a tuple of :class:`~dem_jax.merge.method.MergeMethod` objects, next to
the math it runs. :mod:`dem_jax.merge.registry` finds them; adding a method is
adding a module here.
"""
