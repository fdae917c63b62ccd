"""Error helpers shared by the API and the op launchers."""

import torch


def out_of_memory(error: BaseException, what: str, q: torch.Tensor) -> torch.OutOfMemoryError:
    """A torch.OutOfMemoryError that names our call and shapes, chained to the original.

    The original's message (what was being allocated, what is free) is kept at the end.
    torch's caching allocator has already released what the failed call held, so the
    caller can catch this, shrink the problem and go on.
    """
    B, H, R, L, D = q.shape
    return torch.OutOfMemoryError(
        f"flash_tt_attn.attention: out of memory in the {what} for q of shape {tuple(q.shape)} "
        f"(B={B}, H={H}, rows={R}, L={L}, D={D}, {q.dtype}, {q.device}). Reduce B·H·L² or split the rows. "
        f"Original error: {error}"
    )
