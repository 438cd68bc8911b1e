"""Reference solutions to notebook 02's exercises (try them yourself first)."""


def lora_delta(x, A, B, alpha, r):
    """The LoRA path's output for x (N, in): (alpha / r) * B A x, through rank r. A (r, in), B (out, r)."""
    return (x @ A.T) @ B.T * (alpha / r)                                    # (N, r) -> (N, out)


def count_lora_params(shapes, r):
    """Trainable numbers of LoRA of rank r on linear layers of weight shapes [(out, in), ...]."""
    return sum(r * (n_in + n_out) for n_out, n_in in shapes)


def merge_weight(W, A, B, alpha, r):
    """W (out, in) with the update folded in: W + (alpha / r) B A, a new tensor (W unchanged)."""
    return W + (alpha / r) * (B @ A)
