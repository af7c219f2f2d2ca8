"""Hugging Face model directories (``config.json`` plus safetensors weights).

* ``checkpoint``: load a model directory onto a mesh, export one from memory.
* ``config``: ``config.json`` ⇄ :class:`~dem_jax.config.run.ModelConfig`.
* ``families``: what each family's ``config.json`` says beyond Llama's fields.
* ``weights``: Hugging Face tensor names and layouts ⇄ dem-jax parameters.
* ``safetensors_format``: the file format's dtype codes and file names.
* ``safetensors_reader``: reading files and weight directories a block at a time.
* ``safetensors_writer``: streaming a model out into (sharded) safetensors files.
"""
