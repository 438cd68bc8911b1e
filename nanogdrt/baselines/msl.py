"""MSL [61], a baseline of Tables 2 and 3.

MSL, the masked softmax loss (Wang et al., SIGIR 2025). At target position t the softmax runs
only over the tokens that continue some catalogue title after the target's first t tokens (the
trie's allowed set A_t, walked from the start of the response), at temperature tau:

    loss_t = -z_y / tau + log sum_{v in A_t} exp(z_v / tau)

MSL's code (train_trie_token.py) sets the logits outside A_t to -inf, divides by tau, and takes
the mean over all target tokens of the batch; so do we (`sft_loss` of these per-token losses).
The closing quote and EOS are ordinary trie tokens: where only EOS may follow (almost always
after the closing quote) A_t = {EOS} and the loss is exactly 0, yet the token still counts in
the mean, as in MSL. The same holds at every position with a single continuation: 69% of the
target tokens of Toy's titles. Toy's temperature in MSL's recipe is tau = 4.5.

A pure function of tensors, like `nanogdrt.loss`, reusing its target-token order, so the
per-token losses plug into `sft_loss` (a token mean) and `gdrt_loss` (groups + Q) unchanged.
"""

from typing import Callable

import torch

from nanogdrt.loss import TokenNLL, target_logits


def msl_token_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                   input_ids: torch.Tensor, target_mask: torch.Tensor, allowed_tokens: torch.Tensor,
                   allowed_mask: torch.Tensor, tau: float) -> TokenNLL:
    """MSL's masked softmax loss of every target token, shaped and ordered like `token_nll`.

    logits_fn, hidden, input_ids, target_mask: as for `loss.token_nll`.
    allowed_tokens, allowed_mask: (N, K) allowed set of each target token, in the same order:
        `trie.allowed(trie.target_nodes(input_ids, target_mask))` (padding where mask is False).
    tau: MSL's temperature (> 0); tau = 1 with every vocabulary token allowed is `token_nll`.

    We gather the K allowed logits from the (N, V) logits the LM head produces anyway, instead
    of filling the other V - K with -inf: the forward then reads N*K numbers instead of writing
    an (N, V) bool mask and an (N, V) masked copy and reducing over both; the backward of the
    gather writes one (N, V) gradient, as cross-entropy's does. K, the largest allowed set among
    the N positions, is far below V: at most 760 on Toy (right after the opening quote) against
    V = 49152 for SmolLM2.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    out = target_logits(logits_fn, hidden, input_ids, target_mask)
    N = out.targets.shape[0]
    allowed_mask = allowed_mask.bool()
    if allowed_tokens.shape != allowed_mask.shape or allowed_tokens.shape[0] != N:
        raise ValueError(f"allowed_tokens {tuple(allowed_tokens.shape)} and allowed_mask "
                         f"{tuple(allowed_mask.shape)} must both be (N={N}, K)")
    # The target must be one of its allowed tokens, else the loss is not a softmax over A_t.
    hit = (allowed_tokens == out.targets[:, None]) & allowed_mask           # (N, K)
    missing = ~hit.any(dim=1)                                               # (N,)
    if bool(missing.any()):
        i = int(missing.nonzero()[0])
        raise ValueError(f"example {int(out.rows[i])} of the batch, position {int(out.cols[i])}: "
                         f"target token {int(out.targets[i])} is not in its allowed set (the target "
                         f"is not a catalogue title, or the allowed sets are not in target order)")
    z = out.logits.gather(1, allowed_tokens) / tau                          # (N, K) z_v / tau
    z = z.masked_fill(~allowed_mask, float("-inf"))                         # padding takes no mass
    z_y = out.logits.gather(1, out.targets[:, None]).squeeze(1) / tau       # (N,) z_y / tau
    loss = torch.logsumexp(z, dim=1) - z_y                                  # (N,)
    return TokenNLL(loss, out.rows, out.cols)
