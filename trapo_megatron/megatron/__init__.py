"""Megatron-Core side: platform (distributed init, CPU layer), model builder, vocab-parallel kernels, train step."""
