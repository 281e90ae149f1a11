"""Measuring one run: build the model, step it, count its memory, make its record.

``build`` (model, optimizer, batch), ``steps`` (the one step loop and its meter),
``tracker`` (live tensor bytes), ``nvml`` (device memory), ``run`` (one case on one
device: cuda, cpu or sim), ``distributed`` (each rank under torchrun, or rank 0 of N
simulated), ``isolation`` (many cases in one process, each as if alone).
"""
