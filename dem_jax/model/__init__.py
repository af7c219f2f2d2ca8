"""The model: the Flax NNX decoder of every supported family and what runs on it.

``transformer`` (the decoder: layers stacked and scanned, pure ``apply``),
``layers`` (RMSNorm, projections, attention and the gated MLP, with each family's
switches), ``moe`` (routed experts: Mixtral, Qwen3-MoE), ``attention`` (the kernels),
``rope`` (rotary embeddings and their scalings), ``losses`` (token NLL), ``generate``
(greedy decoding with a KV cache) and ``flops`` (FLOP counts for cost accounting).
"""
