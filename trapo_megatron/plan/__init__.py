"""Cluster planner: per-GPU memory of weights, grads, optimizer states, activations and the colocated vLLM
engine for every TP x PP x DP layout. Plain python, importable without torch, megatron or nemo_run."""
