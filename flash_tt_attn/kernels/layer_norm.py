"""Layer norm over the last dim of a pair tensor's rows, for the block's eager forward.

PyTorch's CUDA layer norm gives each row of c = 128 channels to one thread block, which leaves the GPU's
bandwidth mostly idle (0.29 ms for a 67 MB bf16 pair tensor at L = 512 on an H100: ~0.46 TB/s; PERF.md v32).
Here one program normalizes BLOCK_M whole rows at once. The rows are addressed through the strides of a
(B, R, L, c) view, so the ending node's transposed pair tensor and a chunk of rows are read in place.
Mean and 1/std are kept in fp32 for the backward (PyTorch's own layer-norm backward takes them).
"""

import triton
import triton.language as tl


@triton.jit
def layer_norm_fwd_kernel(
    X, W, Bias, Y, Mean, Rstd,
    stride_xb, stride_xr, stride_xl,
    R, L, M, eps,
    N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y[m] = (X[m] - mean) * rstd * W + Bias for the rows m of program_id(0)'s block, m = (b·R + i)·L + j
    (Y, Mean and Rstd contiguous). Statistics in fp32: mean, then the variance of the centred values."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    j = rows % L
    bi = rows // L
    x_rows = (bi // R) * stride_xb + (bi % R) * stride_xr + j * stride_xl
    ok = row_ok[:, None] & (cols < N)[None, :]
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
