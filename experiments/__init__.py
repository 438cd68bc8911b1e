"""The research harness: the reproduction on real Toy (repro/) and the paper's protocol on a lent GPU
(gpu/). Each is layered, every module importing only the ones below it; both import nanogdrt and
run as `python -m experiments.repro ...` / `python -m experiments.gpu ...` from the repository root."""
