"""`python -m experiments.controlled ...`: the controlled world's staged sweep (experiments/controlled/runner.py)."""

from experiments.controlled.runner import main

if __name__ == "__main__":
    main()
