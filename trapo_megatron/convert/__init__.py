"""Hugging Face <-> Megatron weights: the mapping as data, offline conversion and the live weight stream.

- ``mapping``: name tables with a layer wildcard and three structural entries (QKV weight, QKV bias, gated MLP)
- ``formats``: pure merge/split of fused tensors; ``distribution``: TP split/gather
- ``hf_to_mcore`` / ``mcore_to_hf``: streaming offline conversion (``trapo convert``)
- ``model_io.load_hf_into_model``: HF weights into a built, sharded model
- ``stream.iter_hf_weights`` / ``iter_hf_buckets``: the one (hf_name, tensor) generator for export and engines

Only this package and ``trapo_megatron.megatron`` import megatron (none of these modules does at import time).
"""
