"""Files: where models, vectors and runs live, in both formats, local or gs://.

``storage`` (local paths and URLs behind one API, JSON reads), ``modeldir`` (the
in-memory Model, format detection, atomic output directories, tokenizer assets),
``orbax`` (dem-jax model directories), ``hf/`` (Hugging Face config mapping, key
map, safetensors reader and writer), ``models`` (load, save or initialise any
model), ``tree`` (paths into parameter pytrees), ``run_layout`` (where a run's
outputs go).
"""
