"""Merging models and distribution vectors, in mergekit's language.

One registry of methods (``registry``, collecting ``methods/``: each method one
object declaring its parameters, defaults and kernel, beside its math). Pure math:
``arrays``, ``sparsify``, ``methods/*``. The engine: ``method`` (what a method is),
``params`` (settings resolved per tensor), ``tensor_layout`` (leaves as HF tensors),
``noise`` (mesh-independent draws), ``engine`` (a merge leaf by leaf), ``slices``
(merges over output slices: layer stacking), ``sources`` (reading input leaves, or
a slice's layers of them), ``output`` (writing the result). The YAML entry point:
``request`` (MERGE.yaml to paths and settings) and ``from_config``. Data-aware
merges over whole models: ``with_data``.
"""
