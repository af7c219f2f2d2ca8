"""Files: where models, vectors and runs live, in both formats, local or gs://.

``storage`` (local paths and URLs behind one API, JSON reads), ``outputs`` (output
directories that are complete or absent and never touch an input: overlap checks,
locks, recoverable --overwrite), ``modeldir`` (the in-memory Model, format
detection, tokenizer assets), ``assets`` (the files an export carries beside the
weights), ``model_card`` (README.md cards), ``orbax`` (dem-jax model directories),
``hf/`` (Hugging Face config mapping, key map, safetensors reader and writer),
``models`` (load, save or initialise any model), ``tree`` (paths into parameter
pytrees), ``run_layout`` (where a run's outputs go, and the check that they avoid
its inputs), ``figures`` (matplotlib without a display).
"""
