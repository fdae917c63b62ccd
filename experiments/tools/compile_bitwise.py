"""Check that torch.compile(attention, fullgraph=True) gives bitwise the eager call's output and four gradients.

The shape (B=2 H=4 L=96 D=32 fp16 by default) has L not a multiple of the tiles. Prints one line, e.g.
``compile_vs_eager_bitwise [True, True, True, True, True] max_abs_diff 0``, and exits 1 when any tensor differs.
Meant for a GPU, where the Triton kernels run in both calls. ``--device cpu`` is a smoke test (small shapes only):
there the eager call runs the chunked PyTorch reference and the compiled one Inductor's fusion of it, so bits are
not expected to match, and it exits 1 only when a tensor is not close (fp32: within 1e-5).

Usage: python experiments/tools/compile_bitwise.py [--device cuda] [--L 96] [--dtype float16]
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--L", type=int, default=96)
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = ap.parse_args(argv)

    import torch  # noqa: PLC0415 - keep --help fast

    from flash_tt_attn import attention  # noqa: PLC0415

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.B, args.H, args.L, args.L)
    q, k, v = (torch.randn(*shape, args.D, device=args.device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(*shape, device=args.device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)

    def run(f):
        o = f(q, k, v, bias)
        return [o, *torch.autograd.grad(o, (q, k, v, bias), dout)]

    eager = run(attention)
    compiled = run(torch.compile(attention, fullgraph=True))
    same = [bool(torch.equal(a, b)) for a, b in zip(eager, compiled, strict=True)]
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(eager, compiled, strict=True))
    print("compile_vs_eager_bitwise", same, "max_abs_diff", f"{diff:.3g}")
    if args.device.startswith("cuda"):
        return 0 if all(same) else 1
    return 0 if diff <= {"float32": 1e-5}.get(args.dtype, 1e-2) else 1


if __name__ == "__main__":
    sys.exit(main())
