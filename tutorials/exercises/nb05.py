"""Checks for the exercises of notebook 05 (constrained beam search over a title trie).

Each check calls the learner's function on fixed inputs and compares it with a computation of its
own (`nanogdrt.trie.Trie` for the allowed tokens, torch's gather and topk for scores and pruning),
never with the solution file.
"""
import torch

from nanogdrt.trie import Trie

from exercises import attempt


EOS = 0
# Token paths of a made-up catalogue: each ends in EOS, several share a beginning.
_PATHS = [[5, 7, 9, EOS], [5, 7, 3, EOS], [5, 8, EOS], [6, EOS], [5, 7, 9, 2, EOS], [6, 4, 4, EOS]]


def check_allowed_next(fn) -> bool:
    trie = Trie.from_token_ids(dict(enumerate(_PATHS)), EOS)
    for prefix in [[], [5], [5, 7], [5, 7, 9], [6], [6, 4], [5, 8, EOS], [4], [5, 9]]:
        got = attempt("allowed_next", fn, [list(p) for p in _PATHS], list(prefix))
        if got is None:
            return False
        node = trie.walk(prefix)
        expected = []
        if node is not None:
            a = trie.allowed(torch.tensor([node]))
            expected = a.tokens[0][a.mask[0]].tolist()
        assert list(got) == expected, \
            f"allowed_next: prefix {prefix} -> expected {expected}, got {list(got)} " \
            f"(distinct tokens that follow the prefix in some path, sorted; [] after EOS or off the paths)"
    print("allowed_next: correct")
    return True


def check_title_score(fn) -> bool:
    g = torch.Generator().manual_seed(5)
    for T, V, length_penalty in [(4, 10, 1.0), (4, 10, 0.0), (7, 50, 1.0), (1, 3, 1.0), (6, 20, 0.5)]:
        table = torch.randn(T, V, generator=g).mul(3).log_softmax(-1)     # (T, V): step t's log-probs
        path = torch.randint(0, V, (T,), generator=g).tolist()
        got = attempt("title_score", fn, table.clone(), list(path), length_penalty)
        if got is None:
            return False
        total = table.gather(1, torch.tensor(path)[:, None]).sum()          # sum_t log p(y_t | y_<t)
        expected = float(total) / T ** length_penalty
        assert abs(float(got) - expected) < 1e-4, \
            f"title_score: T={T}, length_penalty={length_penalty}: expected {expected:.4f}, got {float(got):.4f} " \
            f"(sum over t of table[t, path[t]], divided by T ** length_penalty)"
    print("title_score: correct")
    return True


def _step_tables(g, beams):
    """Allowed tokens and their log-probs after each beam's prefix (2 to 4 tokens each, no ties)."""
    tables = {}
    for prefix, _ in beams:
        tokens = torch.randperm(20, generator=g)[:int(torch.randint(1, 4, (1,), generator=g)) + 1].tolist()
        logp = torch.rand(len(tokens), generator=g).mul(-5)
        tables[prefix] = {t: float(x) for t, x in zip(tokens, logp)}
    return tables


def check_prune(fn) -> bool:
    g = torch.Generator().manual_seed(3)
    beams = [((11,), -1.25), ((12,), -2.5), ((13, 14), -0.75)]
    for B in (1, 2, 3, 5, 100):
        tables = _step_tables(g, beams)
        got = attempt("prune", fn, list(beams), {p: dict(t) for p, t in tables.items()}, B)
        if got is None:
            return False
        cands = [(p + (t,), s + lp) for p, s in beams for t, lp in tables[p].items()]
        scores = torch.tensor([s for _, s in cands], dtype=torch.float64)
        top = scores.topk(min(B, len(cands))).indices.tolist()                 # best first
        expected = [cands[i] for i in top]
        got = [(tuple(p), float(s)) for p, s in got]
        assert [p for p, _ in got] == [p for p, _ in expected], \
            f"prune: B={B}: expected prefixes {[p for p, _ in expected]}, got {[p for p, _ in got]} " \
            f"(extend every beam by every allowed token, keep the B best by beam score + log-prob, best first)"
        assert all(abs(s - e) < 1e-9 for (_, s), (_, e) in zip(got, expected)), \
            f"prune: B={B}: the scores should be the beam's score plus the token's log-prob"
    print("prune: correct")
    return True
