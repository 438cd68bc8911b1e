"""nanogdrt: a minimal, readable PyTorch reproduction of GDRT (Group-DRO tuning against context bias in LLM recommenders)."""
