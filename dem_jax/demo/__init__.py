"""The built-in demo: synthetic distributions and a character tokenizer
(:mod:`dem_jax.demo.synthetic`) and the whole pipeline run on them (:mod:`dem_jax.demo.run`)."""
