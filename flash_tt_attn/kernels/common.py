"""Small device functions shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def exp2(x, FAST: tl.constexpr):
    """2**x. With FAST (fp32 on a GPU), one MUFU instruction: ex2.approx.ftz.f32, whose
    relative error (about 2⁻²²) is far below the fp16/bf16 rounding of P; subnormal
    results flush to 0. Otherwise (interpreter, fp64) tl.exp2."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)
