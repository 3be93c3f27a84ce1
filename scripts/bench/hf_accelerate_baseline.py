#!/usr/bin/env python3
"""Peer baseline: Hugging Face transformers + accelerate offloading on the same synthetic MoE shape.

Runs the workload `expertflow bench` runs (closed loop of N requests, C at a time, PROMPT random
token ids, GEN greedy tokens each, EOS ignored) on a transformers model placed with
`device_map="auto"` and `max_memory` = the same GPU budget, and prints/writes the same JSON keys
(results.output_tokens_per_s, ttft_ms_p50/p99, itl_ms_p50/p99, ...), with "system": "hf-accelerate".

  # weights identical to ExpertFlow's: load the checkpoint `expertflow bench --synthetic` wrote
  python3 scripts/bench/hf_accelerate_baseline.py --model-dir $TMPDIR/expertflow-synthetic/mixtral-8x7b-L32-x1-s1 \\
      --budget-pct 50 -n 32 -c 8 --prompt-len 32 --gen-len 32 --json hf_b50.json
  # or random weights from the shape table (torch seeded), no checkpoint on disk
  python3 scripts/bench/hf_accelerate_baseline.py --shape mixtral-8x7b --layers 8 --budget-pct 50 ...

GPU budget: --gpu-max-memory GIB sets max_memory[0] directly; otherwise --budget-pct P gives the
non-expert weights plus P% of the expert weights (what `--cache-slots-per-layer` buys ExpertFlow),
plus --kv-reserve-gib for activations and the KV cache. What does not fit goes to CPU memory
(accelerate's hooks copy it to the GPU layer by layer), then to --offload-dir on disk.

Batching: requests run in static batches of C (transformers has no continuous batching); TTFT is a
batch's prefill time (arrival = batch start), ITL a request's mean time per decode step.
Meant for the accelerator machine (torch, transformers, accelerate installed).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

# Same numbers as launch/synthetic_model.cc (keep in sync).
SHAPES = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=32768),
    "qwen1.5-moe": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                        num_experts=60, num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=16,
                        max_position_embeddings=8192, norm_topk_prob=False),
    # Approximation (as in ExpertFlow): MLA -> MHA, 2 shared experts -> one of 2816, layer 0 dense.
    "deepseek-v2-lite": dict(model_type="qwen2_moe", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, shared_expert_intermediate_size=2816, num_hidden_layers=27,
                             num_experts=64, num_experts_per_tok=6, num_attention_heads=16, num_key_value_heads=16,
                             max_position_embeddings=32768, mlp_only_layers=[0], norm_topk_prob=False),
    "olmoe": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                  num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, num_attention_heads=16,
                  num_key_value_heads=16, max_position_embeddings=4096, norm_topk_prob=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                          norm_topk_prob=True),
    "tiny": dict(model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=1024),
}


def percentile(v, p):
    if not v:
        return 0.0
    s = sorted(v)
    return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]


def expert_param_fraction(model):
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    return total, expert


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="HF checkpoint dir (e.g. the one `expertflow bench --synthetic` wrote)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (torch seeded)")
    ap.add_argument("--layers", type=int, default=0, help="with --shape: layer count (0: the shape's)")
    ap.add_argument("--budget-pct", type=float, default=100.0, help="GPU budget: %% of expert weights on the GPU")
    ap.add_argument("--gpu-max-memory", type=float, default=0.0, help="GPU budget in GiB (overrides --budget-pct)")
    ap.add_argument("--kv-reserve-gib", type=float, default=2.0, help="GPU memory kept for KV cache/activations")
    ap.add_argument("--cpu-max-memory", type=float, default=0.0, help="CPU memory for offloaded weights, GiB (0: auto)")
    ap.add_argument("--offload-dir", default="", help="disk offload folder when CPU memory does not suffice")
    ap.add_argument("-n", "--num-requests", type=int, default=32)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="", help="also write the record here")
    a = ap.parse_args()

    try:
        import torch
        import transformers
        import accelerate
        from accelerate import dispatch_model, infer_auto_device_map
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        sys.exit(f"hf_accelerate_baseline.py: {e.name or e} is not installed; this baseline needs torch, "
                 "transformers and accelerate (it is meant for the accelerator machine)")
    if not torch.cuda.is_available():
        sys.exit("hf_accelerate_baseline.py: no CUDA device visible; the baseline measures GPU offloading")

    torch.manual_seed(a.seed)
    GiB = 2**30
    if a.model_dir:
        cfg = AutoConfig.from_pretrained(a.model_dir)
        shape_name = os.path.basename(os.path.normpath(a.model_dir))
    else:
        kw = dict(SHAPES[a.shape])
        model_type = kw.pop("model_type")
        if a.layers:
            kw["num_hidden_layers"] = a.layers
            if "mlp_only_layers" in kw:
                kw["mlp_only_layers"] = [l for l in kw["mlp_only_layers"] if l < a.layers]
        cfg = AutoConfig.for_model(model_type, **kw)
        shape_name = a.shape
    # Parameter counts without allocating: an empty-weights model.
    with accelerate.init_empty_weights():
        empty = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    total, expert = expert_param_fraction(empty)
    bytes_total, bytes_expert = 2 * total, 2 * expert
    if a.gpu_max_memory > 0:
        gpu_bytes = int(a.gpu_max_memory * GiB)
    else:
        gpu_bytes = int(bytes_total - bytes_expert + a.budget_pct / 100.0 * bytes_expert + a.kv_reserve_gib * GiB)
    max_memory = {0: gpu_bytes}
    if a.cpu_max_memory > 0:
        max_memory["cpu"] = int(a.cpu_max_memory * GiB)
    else:
        import psutil  # accelerate depends on it
        max_memory["cpu"] = int(psutil.virtual_memory().available * 0.9)

    t_load = time.time()
    if a.model_dir:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=torch.bfloat16, device_map="auto",
                                                     max_memory=max_memory,
                                                     offload_folder=a.offload_dir or None)
    elif bytes_total + a.kv_reserve_gib * GiB <= gpu_bytes:
        # Everything on the GPU: initialise there (seeded), minutes faster than on the CPU.
        with torch.device("cuda:0"):
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)  # random init, seeded
        no_split = getattr(model, "_no_split_modules", None)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        model = dispatch_model(model, device_map=device_map, offload_dir=a.offload_dir or None)
    model.eval()
    load_s = time.time() - t_load
    placement = {}
    for _, dev in getattr(model, "hf_device_map", {"": "cuda:0"}).items():
        placement[str(dev)] = placement.get(str(dev), 0) + 1

    g = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(3, cfg.vocab_size, (a.num_requests, a.prompt_len), generator=g)
    ttft, itl = [], []
    gen_tokens = 0
    torch.cuda.synchronize()
    t0 = time.time()
    with torch.inference_mode():
        for start in range(0, a.num_requests, a.concurrency):
            ids = prompts[start:start + a.concurrency].to("cuda:0")
            b0 = time.time()
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            first = time.time()
            steps = 1
            for _ in range(a.gen_len - 1):
                out = model(input_ids=nxt.to("cuda:0"), past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                steps += 1
            torch.cuda.synchronize()
            last = time.time()
            for _ in range(ids.shape[0]):
                ttft.append(first - b0)
                itl.append((last - first) / (steps - 1) if steps > 1 else 0.0)
            gen_tokens += steps * ids.shape[0]
    wall = time.time() - t0
    res = {
        "output_tokens_per_s": gen_tokens / wall,
        "total_tokens_per_s": (gen_tokens + a.prompt_len * a.num_requests) / wall,
        "ttft_ms_p50": 1e3 * percentile(ttft, 0.5),
        "ttft_ms_p99": 1e3 * percentile(ttft, 0.99),
        "itl_ms_p50": 1e3 * percentile(itl, 0.5),
        "itl_ms_p99": 1e3 * percentile(itl, 0.99),
        "wall_s": wall,
        "generated_tokens": gen_tokens,
        "gpu_peak_mib": torch.cuda.max_memory_allocated(0) / 2**20,
    }
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    record = {
        "system": "hf-accelerate",
        "git_sha": sha,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
        "device": torch.cuda.get_device_name(0),
        "model": a.model_dir or f"random {shape_name}",
        "model_shape": {"num_layers": cfg.num_hidden_layers, "num_experts": getattr(cfg, "num_local_experts", None)
                        or getattr(cfg, "num_experts", None), "top_k": cfg.num_experts_per_tok,
                        "hidden_size": cfg.hidden_size, "param_bytes": bytes_total, "expert_bytes": bytes_expert},
        "cache": {"budget_fraction": a.budget_pct / 100.0, "gpu_max_memory_bytes": gpu_bytes,
                  "placement_modules": placement, "policy": "hf-accelerate"},
        "workload": {"num_requests": a.num_requests, "concurrency": a.concurrency, "prompt_len": a.prompt_len,
                     "gen_len": a.gen_len, "seed": a.seed, "batching": "static"},
        "load_s": load_s,
        "results": res,
    }
    print(f"# hf-accelerate baseline  {record['device']}  torch {torch.__version__}  transformers "
          f"{transformers.__version__}  accelerate {accelerate.__version__}")
    print(f"# model {record['model']}: {bytes_total / GiB:.2f} GiB bf16 ({bytes_expert / GiB:.2f} GiB experts); "
          f"GPU max_memory {gpu_bytes / GiB:.2f} GiB; modules per device {placement}")
    print("%8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s" % ("requests", "conc", "prompt", "gen", "out_tok/s",
                                                             "all_tok/s", "ttft_p50", "ttft_p99", "itl_p50",
                                                             "itl_p99", "wall"))
    print("%8d %5d %6d %6d %10.1f %10.1f %9.2f %9.2f %9.3f %9.3f %9.2f" % (
        a.num_requests, a.concurrency, a.prompt_len, a.gen_len, res["output_tokens_per_s"],
        res["total_tokens_per_s"], res["ttft_ms_p50"], res["ttft_ms_p99"], res["itl_ms_p50"], res["itl_ms_p99"],
        wall))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
