"""``dem-jax plan``: will a run config fit on a TPU slice?

* ``tpu``: TPU generations and slices (devices, hosts, HBM, runtime versions).
* ``architectures``: model architectures known without weights, and resolving a
  run's architecture from a name, a ``config.json``, a model directory or the run config.
* ``memory``: the per-device memory plan (parameters, optimizer state, gradients,
  gathered weights, activations) and its table and JSON forms.
"""
