"""Shared fixtures: the embedded model is loaded once per test session; real data is optional."""

from pathlib import Path

import pytest
import torch

from nanogdrt.checkpoint import ensure_embedded_checkpoint

TOY_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "toy"


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return ensure_embedded_checkpoint()


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    """The embedded SmolLM2-135M-Instruct in float32, eval mode. Do not modify it in a test."""
    from nanogdrt.llama import Llama

    return Llama.from_pretrained(smollm_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from nanogdrt.tokenizer import Tokenizer

    return Tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def hf_smollm(smollm_dir):
    """transformers' LlamaForCausalLM on the same converted folder (the reference)."""
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    if not (TOY_DIR / "id2name.json").is_file():
        pytest.skip(f"real Toy data not found at {TOY_DIR} (only present beside the repo as ../shared)")
    return TOY_DIR
