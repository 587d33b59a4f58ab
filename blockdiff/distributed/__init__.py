"""Tensor- and expert-parallel inference over torch.distributed (gloo on CPU, NCCL on CUDA).

`LLM(..., tensor_parallel_size=N)` keeps the scheduler in its process (the driver) and starts N
worker processes, one per device, each holding one shard of the model (`layout.py`) and running
the same runner calls on the same batches (`executor.py` -> `worker.py`); the collectives that make
the shards compute the whole model are wired from outside the model's code (`shard.py`, `vocab.py`).
"""
