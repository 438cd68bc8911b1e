"""`python -m experiments.gpu ...`: the GPU protocol's commands (experiments/gpu/protocol.py)."""

from experiments.gpu.protocol import main

if __name__ == "__main__":
    main()
