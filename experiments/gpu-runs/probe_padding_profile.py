import sys
import torch
from torch.profiler import ProfilerActivity, profile
from flash_tt_attn import TriangleAttention, ops
out = open(sys.argv[1], "w")
L = 1024
m = TriangleAttention(128, 32, 4).cuda().bfloat16()
x = torch.randn(2, L, L, 128, device="cuda", dtype=torch.bfloat16)
lengths = torch.tensor([L, L // 2], device="cuda")
for name, opts in (("default", {}), ("ln_fused", {"block_triton_layer_norm": True, "block_fused_projections": True})):
    for call, kw in (("full", {}), ("padded", {"lengths": lengths})):
        with ops.override(**opts), torch.no_grad():
            for _ in range(3):
                m(x, **kw)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    m(x, **kw)
                torch.cuda.synchronize()
        ev = sorted([e for e in prof.key_averages() if e.device_time_total > 0], key=lambda e: -e.device_time_total)
        print(f"\n== {name} {call}: {sum(e.device_time_total for e in ev) / 5000:.3f} ms", file=out)
        for e in ev[:12]:
            print(f"{e.device_time_total / 5000:8.3f} ms {e.count // 5:3d}x {e.key[:90]}", file=out)
out.close()
print(open(sys.argv[1]).read())
