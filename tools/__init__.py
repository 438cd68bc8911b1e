"""One-off inspection tools, each importing only nanogdrt; run from the repository root:

    python -m tools.token_groups ...       a dataset's token groups and Eq. 5's weights before training
    python -m tools.eq2_title_tokens ...   items that change item group when Eq. 2 skips the format tokens
    python -m tools.prompt_lengths ...     prompt lengths in tokens (batch and KV-cache sizing)
    python -m tools.execute_tutorials      executes tutorials/*.ipynb in place (make tutorials)
"""
