"""The paper's protocol on a lent GPU (docs/gpu_protocol.md): `python -m experiments.gpu status`.

Layers, each importing only the ones above it in this list (and nanogdrt: the selection rule and the
bootstrap are nanogdrt/stats.py's, shared with experiments/repro):
    transfer.py    the model, data and state across the device's limits (`python -m experiments.gpu.transfer`)
    plan.py        the state folder: plan, estimates, chunk sizes, status, the deadline-bound process runner
    report.py      Table 2 with bootstrap intervals (nanogdrt/stats.py), on CPU
    protocol.py    the stages and the command line (__main__.py: `python -m experiments.gpu`)
device_check.py stands apart: CUDA checks for a machine with a GPU (`python -m experiments.gpu.device_check`).
"""
