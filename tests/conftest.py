"""Shared fixtures: the embedded model is loaded once per test session; real data is optional."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nanogdrt.checkpoint import ensure_embedded_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = ROOT.parent / "shared" / "data" / "toy"


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir):
    """A 2-layer, 64-wide random Llama that shares the embedded model's tokenizer: runs the whole
    pipeline (train.py, analyze, recommend) in seconds."""
    from safetensors.torch import save_file

    from nanogdrt.llama import Llama, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = json.loads((smollm_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_dir / name, folder / name)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(cfg))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def train_py():
    """`python train.py ARGS` run in this process (train.py is a script, not a library): a test
    can point $NANOGDRT_CACHE elsewhere or patch a nanogdrt function the script imports."""
    def run(*argv):
        saved = sys.argv
        sys.argv = [str(ROOT / "train.py"), *map(str, argv)]
        try:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        except SystemExit as e:   # sys.exit(main()) on success, 0 after --help
            if e.code not in (None, 0):
                raise
        finally:
            sys.argv = saved
    return run
