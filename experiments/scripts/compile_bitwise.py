"""GPU check: torch.compile(attention, fullgraph=True) against eager, bitwise, for the output and the four
gradients (B=2 H=4 L=96 D=32 fp16: L not a multiple of the tiles). Prints one line."""
import torch

from flash_tt_attn import attention

torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 96, 96, 32, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
bias = torch.randn(2, 4, 96, 96, device="cuda", dtype=torch.float16, requires_grad=True)
do = torch.randn_like(q)
def run(f):
    o = f(q, k, v, bias)
    return [o] + list(torch.autograd.grad(o, (q, k, v, bias), do))
eager = run(attention)
comp = run(torch.compile(attention, fullgraph=True))
print("compile_vs_eager_bitwise", [bool(torch.equal(a, b)) for a, b in zip(eager, comp, strict=True)])
