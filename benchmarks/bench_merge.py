"""The cost of merging a LoRA adapter into a model: ``minilora merge`` against the PyTorch route and
against copying the file.

Setup (not timed): a Llama-like model built with ``transformers`` from a config with random
weights, saved in bfloat16 with ``save_pretrained``, and an all-linear r=16 adapter (random A and
B) made and saved by PEFT. Then each case runs in a fresh process, measured by the parent with
``os.wait4`` (that child's own CPU time and peak RSS):

    copy      copy model.safetensors to a new file and fsync it (the floor for any merge)
    minilora  python -m minilora merge BASE ADAPTER OUT.safetensors
    pytorch   from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained

and the two merged outputs are compared tensor by tensor, bit for bit. Usage:

    python benchmarks/bench_merge.py [--hidden 2048 --layers 12 --intermediate 5632 --vocab 32000]
                                     [--small] [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)


def build(workdir: str, hidden: int, layers: int, intermediate: int, vocab: int) -> tuple[str, str]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                                      vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base, adapter = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    model.save_pretrained(base, max_shard_size="100GB")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    return base, adapter


def torch_route(base: str, adapter: str, out: str) -> None:
    """The PyTorch route, in this (fresh) process."""
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size="100GB")


def copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        shutil.copyfileobj(s, d, 16 << 20)
        d.flush()
        os.fsync(d.fileno())


def measure(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def compare_outputs(a: str, b: str) -> dict:
    """{"equal", "tensors", "differing_tensors", "differing_elements", "max_ulps"} of two
    checkpoints, tensor by tensor on the bits (ulps: distance in the tensor's own dtype)."""
    import numpy as np

    from minilora.formats.checkpoint import open_checkpoint, read_tensor

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.entries) != set(cb.entries):
        return {"equal": False, "tensors": 0, "differing_tensors": -1, "differing_elements": -1, "max_ulps": -1}
    tensors: dict = {}
    for ck, slot in ((ca, 0), (cb, 1)):
        for shard in ck.shards:
            with open(shard.path, "rb") as fh:
                for name in shard.entries:
                    tensors.setdefault(name, [None, None])[slot] = read_tensor(shard, fh, name)
    diff_t = diff_e = max_ulps = 0
    for x, y in tensors.values():
        if x.tobytes() == y.tobytes():
            continue
        diff_t += 1
        ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize]
        xi, yi = (np.ascontiguousarray(v).view(ints).astype(np.int64).reshape(-1) for v in (x, y))
        top = np.int64(1) << (8 * x.dtype.itemsize - 1)
        xi, yi = (np.where(v < 0, -(v + top), v) for v in (xi, yi))  # sign-magnitude -> ordered
        d = np.abs(xi - yi)
        diff_e += int(np.count_nonzero(d))
        max_ulps = max(max_ulps, int(d.max()))
    return {"equal": diff_t == 0, "tensors": len(tensors), "differing_tensors": diff_t,
            "differing_elements": diff_e, "max_ulps": max_ulps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--small", action="store_true", help="a quick run: hidden 256, 2 layers, vocab 1000")
    p.add_argument("--workdir", help="where to build the model (default: a temp folder, removed afterwards)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--torch-route", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--copy", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:
        build(args.workdir, args.hidden, args.layers, args.intermediate, args.vocab)
        return 0
    if args.torch_route:
        torch_route(*args.torch_route)
        return 0
    if args.copy:
        copy_file(*args.copy)
        return 0
    if args.small:
        args.hidden, args.layers, args.intermediate, args.vocab = 256, 2, 688, 1000
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_merge.")
    os.makedirs(workdir, exist_ok=True)
    try:
        # built in a child: this process stays small (a child's peak RSS starts from its parent's at fork)
        me = [sys.executable, os.path.abspath(__file__)]
        subprocess.run([*me, "--build", "--workdir", workdir, "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--intermediate", str(args.intermediate), "--vocab", str(args.vocab)], check=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.DEVNULL)
        base, adapter = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
        base_file = os.path.join(base, "model.safetensors")
        size_mb = os.path.getsize(base_file) / 1e6
        ml_out, pt_out = os.path.join(workdir, "merged_minilora.safetensors"), os.path.join(workdir, "merged_torch")
        rows = {
            "copy": measure([*me, "--copy", base_file, os.path.join(workdir, "copy.safetensors")]),
            "minilora": measure([sys.executable, "-m", "minilora", "merge", base_file, adapter, ml_out]),
            "pytorch": measure([*me, "--torch-route", base, adapter, pt_out]),
        }
        cmp = compare_outputs(ml_out, pt_out)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in rows.values():
        r["mb_per_s"] = size_mb / r["wall_s"]
    ml, pt, cp = rows["minilora"], rows["pytorch"], rows["copy"]
    ratios = {"wall_vs_pytorch": ml["wall_s"] / pt["wall_s"], "wall_vs_copy": ml["wall_s"] / cp["wall_s"],
              "rss_vs_pytorch": ml["peak_rss_mb"] / pt["peak_rss_mb"]}
    print(f"model: Llama-like hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"vocab {args.vocab}, bfloat16, {size_mb:,.0f} MB; adapter all-linear r=16")
    print(f"{'case':<10} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'MB/s':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_rss_mb']:>12,.0f} {r['mb_per_s']:>8,.0f}")
    print(f"minilora / pytorch wall {ratios['wall_vs_pytorch']:.2f}x (target <= 0.5), / copy {ratios['wall_vs_copy']:.2f}x "
          f"(target <= 4), peak RSS / pytorch {ratios['rss_vs_pytorch']:.2f}x (target <= 0.3)")
    print(f"outputs bit-equal: {cmp['equal']} ({cmp['tensors']} tensors; differing: {cmp['differing_tensors']} "
          f"tensors, {cmp['differing_elements']} elements, at most {cmp['max_ulps']} ulps)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.processor() or platform.machine(), "size_mb": size_mb,
                       "config": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                                  "vocab": args.vocab}, "cases": rows, "ratios": ratios, "bit_equal": cmp["equal"],
                       "comparison": cmp}, fh, indent=2)
    return 0 if cmp["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
