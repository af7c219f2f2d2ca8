"""The model: the Flax NNX Llama-family decoder and what runs on it.

``transformer`` (layers stacked and scanned, pure ``apply``), ``rope`` (rotary
embeddings and their scalings), ``losses`` (token NLL), ``generate`` (greedy
decoding with a KV cache) and ``flops`` (FLOP counts for cost accounting).
"""
