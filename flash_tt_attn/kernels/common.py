"""Small device functions shared by the kernels.

Every kernel starts with ``if ACC_DTYPE == tl.float32: scale = tl.cast(scale, tl.float32)``: an eager launch
passes a Python float as an fp32 scalar, but torch.compile's generated launch may pass it as fp64 (Inductor's
``_use_fp64_for_unbacked_floats``), and fp64 arithmetic on it would round differently from eager (it made dq
and dk differ bitwise). It is inline, not a function here: in the interpreter, a function's returned Python
float comes back as an fp32 value, and the fp64 path must keep the scale at full precision."""

import triton
import triton.language as tl

# log2(e): the kernels keep their softmax in base 2 (exp(x) = 2**(x·LOG2E)), so exp2 is the only exponential.
LOG2E = tl.constexpr(1.4426950408889634)


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


@triton.jit
def prescale(q, scale, Q_PRESCALED: tl.constexpr):
    """q·scale in q's dtype when Q_PRESCALED (one multiply per q element instead of one per score)."""
    if Q_PRESCALED:
        return (q * scale).to(q.dtype)
    else:
        return q


@triton.jit
def scores(q, kt, bias, scale, Q_PRESCALED: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """scale·q·kᵀ + bias in ACC_DTYPE. With Q_PRESCALED, q already holds q·scale and the bias tile is the
    product's accumulator; otherwise (fp16 with |scale| > 1, where q·scale could overflow) the scale is
    applied to the fp32 product."""
    if Q_PRESCALED:
        return tl.dot(q, kt, acc=bias, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    else:
        return tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale + bias


@triton.jit
def settle(x, ENABLED: tl.constexpr):
    """x, unchanged. With ENABLED (fp32 x on a GPU) it passes through an identity that the compiler cannot
    see through, so Triton waits for the product that made x within the same loop iteration. Without it,
    an accumulating product (dk += ..., dq += ...) stays in flight across the loop's back edge, and ptxas
    then serializes every wgmma of the kernel, each one followed by its own wait (its warning C7515)."""
    if ENABLED:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return x
