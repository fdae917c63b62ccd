"""Throw-away probe: where the TriangleAttention block's time goes (torch.profiler, device time per kernel)."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from flash_tt_attn import TriangleAttention, ops

torch.manual_seed(0)
out = open(sys.argv[1], "w")
VARIANTS = {"default": {}, "layer_norm": {"block_triton_layer_norm": True}, "layer_norm_fused": {"block_triton_layer_norm": True, "block_fused_projections": True}}
for L, grad in ((512, False), (1024, False), (384, True)):
    m = TriangleAttention(128, 32, 4).cuda().bfloat16()
    x = torch.randn(1, L, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    mask = torch.ones(1, L, L, device="cuda", dtype=torch.bool)
    for name, opts in VARIANTS.items():
        with ops.override(**opts):
            def step():
                if grad:
                    m(x, mask).sum().backward()
                else:
                    with torch.no_grad():
                        m(x, mask)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_time_total > 0]
        ev.sort(key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in ev) / 10
        print(f"\n== L={L} {'fwd_bwd' if grad else 'fwd no_grad'} {name}: device total {total / 1000:.3f} ms/call", file=out)
        for e in ev[:25]:
            print(f"{e.device_time_total / 10 / 1000:8.3f} ms {e.count // 10:3d}x  {e.key[:110]}", file=out)
out.close()
print(open(sys.argv[1]).read()[:6000])
