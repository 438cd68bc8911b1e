"""Checks of the notebooks' exercises, one module per notebook (nbNN.py)."""


def attempt(name, fn, *args):
    """fn(*args), or None (after saying so) while the learner's stub still raises NotImplementedError."""
    try:
        return fn(*args)
    except NotImplementedError:
        print(f"{name}: not attempted yet")
        return None
