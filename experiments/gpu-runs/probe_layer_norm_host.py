"""Throw-away probe: host time of the block's eager forward with the Triton layer norm (cProfile), and of the norm alone."""
import cProfile
import io
import pstats
import sys
import time

import torch

from flash_tt_attn import TriangleAttention, api, ops
from flash_tt_attn.kernels.layer_norm import layer_norm_fwd_kernel

out = open(sys.argv[1], "w")
m = TriangleAttention(128, 32, 4).cuda().bfloat16()
x = torch.randn(1, 256, 256, 128, device="cuda", dtype=torch.bfloat16)


def host_us(f, n=200):
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


with torch.no_grad():
    print("norm alone, host us/call: torch", round(host_us(lambda: m.layer_norm(x)), 1),
          "triton", round(host_us(lambda: api.layer_norm_rows(x, m.layer_norm)), 1),
          "launch only", round(host_us(lambda: ops.launch_layer_norm(x, m.layer_norm.weight, m.layer_norm.bias, 1e-5)), 1), file=out)
    for name, opts in (("default", {}), ("layer_norm", {"block_triton_layer_norm": True})):
        with ops.override(**opts):
            print(name, "block forward host us/call", round(host_us(lambda: m(x)), 1), file=out)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(50):
                m(x)
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
            print(s.getvalue()[-4000:], file=out)
launcher = ops._LAUNCHERS[layer_norm_fwd_kernel]
print("layer norm launcher hits", launcher.hits, "misses", launcher.misses, "enabled", launcher.enabled, file=out)
out.close()
print(open(sys.argv[1]).read())
