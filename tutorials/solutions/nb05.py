"""Reference solutions of notebook 05's exercises (constrained beam search over a title trie)."""
import torch


def allowed_next(paths: list[list[int]], prefix: list[int]) -> list[int]:
    """The tokens that may follow `prefix`: every path that starts with it continues with one of
    them. Distinct, sorted; [] when no path continues (prefix is a whole path, or leaves them all)."""
    n = len(prefix)
    return sorted({p[n] for p in paths if len(p) > n and p[:n] == prefix})


def title_score(step_log_probs: torch.Tensor, path: list[int], length_penalty: float) -> float:
    """step_log_probs (T, V): row t holds log p(. | prompt, path[:t]). A title's beam-search score:
    sum_t log p(path[t] | ...) / T ** length_penalty (1: the mean per token, 0: the plain sum)."""
    T = len(path)
    total = sum(float(step_log_probs[t, tok]) for t, tok in enumerate(path))
    return total / T ** length_penalty


def prune(beams: list[tuple[tuple, float]], next_log_probs: dict, B: int) -> list[tuple[tuple, float]]:
    """One step of beam search. beams: (prefix, accumulated log-prob) pairs; next_log_probs[prefix]:
    {allowed token: its log-prob after prefix}. Every beam is extended by every allowed token, and
    the B best extensions by accumulated log-prob are kept, best first."""
    candidates = [(prefix + (tok,), score + lp)
                  for prefix, score in beams for tok, lp in next_log_probs[prefix].items()]
    return sorted(candidates, key=lambda c: c[1], reverse=True)[:B]
