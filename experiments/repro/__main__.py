"""`python -m experiments.repro ...`: the staged reproduction (experiments/repro/runner.py)."""

from experiments.repro.runner import main

if __name__ == "__main__":
    main()
