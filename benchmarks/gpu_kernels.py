"""GPU kernel ceilings and attention kernels (tools/gpu_check.sh stage 1).

    python benchmarks/gpu_kernels.py [--out FILE.json] [--repeats 10]
    python benchmarks/gpu_kernels.py --dry-run      # CPU: the numerical match at a tiny size

Measures, side by side in one process on one GPU:
- bf16 GEMM 8192^3: the measured matmul peak that MFU figures are also quoted against;
- SDPA forward+backward at the 8B attention shape (micro batch 4, 32 heads, s 4096, d 128,
  no mask), with the kernel torch picks and with flash forced;
- FlexAttention forward+backward on the 2L block-diffusion mask (L 4096, block 16, 2L 8192,
  micro batch 2, 32 heads, d 128): compile time, step time, peak memory, against dense masked
  SDPA (boolean mask) of the same mask;
- numerical match at a small size: flex and masked SDPA against an fp32 softmax reference,
  forward output and q/k/v gradients.
Times are medians of CUDA-event-timed repeats after warm-up. Prints a markdown table last.

Shape legend: B batch, H heads, S query/key length, D head dim, L clean length, K block size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cuda_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def gemm(n: int, repeats: int) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, repeats, warmup=3)
    return {"kernel": "bf16 GEMM", "shape": f"{n}^3", "ms": t * 1e3, "tflops": 2 * n ** 3 / t / 1e12}


def qkv(B: int, H: int, S: int, D: int, dtype, seed: int = 0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]


def fwd_bwd(attn, q, k, v):
    def step():
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
    return step


def peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def sdpa_8b(repeats: int, B=4, H=32, S=4096, D=128) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(B, H, S, D, torch.bfloat16)
    flops = 3.5 * 4 * B * H * S * S * D  # forward 4BHS^2D, backward 2.5x forward
    rows = []
    for name, backends in (("SDPA (torch's choice)", None), ("SDPA flash forced", [SDPBackend.FLASH_ATTENTION])):
        def attn(q, k, v):
            if backends is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v)
        step = fwd_bwd(attn, q, k, v)
        try:
            t = cuda_time(step, repeats)
            rows.append({"kernel": name, "shape": f"B{B} H{H} S{S} D{D} bf16 fwd+bwd", "ms": t * 1e3,
                         "tflops": flops / t / 1e12, "mem_gib": peak_gib(step)})
        except RuntimeError as e:
            rows.append({"kernel": name, "shape": f"B{B} H{H} S{S} D{D}", "error": str(e).splitlines()[0][:120]})
    return rows


def flex_vs_dense_2l(repeats: int, B=2, H=32, L=4096, K=16, D=128) -> list[dict]:
    import torch.nn.functional as F

    from dlm_megatron.diffusion import block as bd
    from dlm_megatron.model import attention as att

    S = 2 * L
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    block_mask = att.block_mask_2l(L, K, dev)
    t_mask = time.perf_counter() - t0
    allowed = ~bd.block_diffusion_mask(L, K).to(dev)  # [1, 1, S, S], True = may attend
    density = allowed.float().mean().item()
    flex = att.flex_attention_fn(dev)
    q, k, v = qkv(B, H, S, D, torch.bfloat16)
    flex_step = fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=block_mask), q, k, v)
    t0 = time.perf_counter()
    flex_step()
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t0
    t_flex = cuda_time(flex_step, repeats)
    m_flex = peak_gib(flex_step)
    dense_step = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), q, k, v)
    t_dense = cuda_time(dense_step, repeats)
    m_dense = peak_gib(dense_step)
    useful = 3.5 * 4 * B * H * S * S * D * density  # FLOPs of the allowed pairs only
    shape = f"2L={S} (L {L}, block {K}) B{B} H{H} D{D} bf16 fwd+bwd"
    return [
        {"kernel": "FlexAttention 2L mask", "shape": shape, "ms": t_flex * 1e3, "tflops": useful / t_flex / 1e12,
         "mem_gib": m_flex, "compile_s": t_compile, "block_mask_s": t_mask, "sparsity_pct": block_mask.sparsity(),
         "ratio_vs_dense": t_flex / t_dense},
        {"kernel": "dense masked SDPA 2L mask", "shape": shape, "ms": t_dense * 1e3, "tflops": useful / t_dense / 1e12,
         "mem_gib": m_dense, "mask_density": density},
    ]


def numerics(device: str, dtype, B=2, H=4, L=256, K=16, D=64, backward: bool = True) -> dict:
    """Max abs differences of flex and masked SDPA against an fp32 softmax reference."""
    import torch.nn.functional as F

    from dlm_megatron.diffusion import block as bd
    from dlm_megatron.model import attention as att

    dev = torch.device(device)
    S = 2 * L
    masked_out = bd.block_diffusion_mask(L, K).to(dev)
    scale = D ** -0.5

    def reference(q, k, v):
        s = (q.double() @ k.double().transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(masked_out, float("-inf")), -1) @ v.double()

    impls = {
        "flex": lambda q, k, v: att.flex_attention_fn(dev)(q, k, v, block_mask=att.block_mask_2l(L, K, dev), scale=scale),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=~masked_out, scale=scale),
    }
    res = {}
    # inputs rounded to the kernel's dtype first, so the reference sees exactly what the kernels see
    q0, k0, v0 = (t.detach().to(dtype).float().requires_grad_() for t in qkv(B, H, S, D, torch.float32, seed=1, device=dev))
    ref = reference(q0, k0, v0) if backward else reference(q0.detach(), k0.detach(), v0.detach())
    if backward:
        ref.sum().backward()
        ref_g = [t.grad.clone() for t in (q0, k0, v0)]
    for name, fn in impls.items():
        q, k, v = (t.detach().to(dtype).requires_grad_(backward) for t in (q0, k0, v0))
        if backward:
            out = fn(q, k, v)
            out.float().sum().backward()
            gerr = max((t.grad.double() - g).abs().max().item() for t, g in zip((q, k, v), ref_g))
        else:
            with torch.no_grad():
                out = fn(q, k, v)
            gerr = float("nan")
        res[name] = {"out_max_abs": (out.double() - ref).abs().max().item(), "grad_max_abs": gerr}
    return res


def table(rows: list[dict]) -> str:
    lines = ["| kernel | shape | median ms | TFLOP/s | peak mem GiB | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | - | - | - | error: {r['error']} |")
            continue
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("kernel", "shape", "ms", "tflops", "mem_gib"))
        mem = f"{r['mem_gib']:.2f}" if "mem_gib" in r else "-"
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['ms']:.3f} | {r['tflops']:.0f} | {mem} | {notes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats per kernel (median reported)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check: run the numerical match at a tiny size (forward only) and exit")
    a = ap.parse_args(argv)
    if a.dry_run:
        res = numerics("cpu", torch.float32, B=1, H=2, L=64, K=16, D=16, backward=False)
        bad = {k: v for k, v in res.items() if not v["out_max_abs"] < 1e-4}
        print(f"gpu_kernels dry run: {json.dumps(res)}")
        return 1 if bad else 0
    if not torch.cuda.is_available():
        print("gpu_kernels.py: error: needs CUDA (use --dry-run on CPU)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, out = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    rows.append(gemm(8192, a.repeats))
    print(table(rows[-1:]), flush=True)
    rows += sdpa_8b(a.repeats)
    print(table(rows[-2:]), flush=True)
    try:
        rows += flex_vs_dense_2l(a.repeats)
    except Exception as e:  # report and carry on: the numerics below still say something
        rows.append({"kernel": "FlexAttention 2L mask", "shape": "2L=8192", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    out["numerics_fp32"] = numerics("cuda", torch.float32)
    out["numerics_bf16"] = numerics("cuda", torch.bfloat16)
    out["rows"] = rows
    print(f"numerics (max abs vs fp64 reference): fp32 {json.dumps(out['numerics_fp32'])}; bf16 {json.dumps(out['numerics_bf16'])}")
    print("\n" + table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
