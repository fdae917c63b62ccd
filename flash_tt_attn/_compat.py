"""Refuse to import against a torch or triton older than the oldest versions we test.

Runs once, when :mod:`flash_tt_attn` is imported. Versions are read without importing
triton (importing it would freeze ``TRITON_INTERPRET`` before a caller sets it) and
parsed without the ``packaging`` package, which a bare environment may lack.

Set ``FLASH_TT_ATTN_SKIP_VERSION_CHECK=1`` to try an older release at your own risk.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

# Keep in step with `dependencies` in pyproject.toml and the README's support table.
MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)

# Distributions that provide the `triton` module: PyPI's, and PyTorch's nightly/ROCm builds.
_TRITON_DISTS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-nightly")

__all__ = ["MIN_TORCH", "MIN_TRITON", "parse_version", "check_version", "check_versions"]


def parse_version(text: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``"2.11.0+cu130"`` → ``(2, 11, 0)``.

    Pre-release, dev and local suffixes (``rc1``, ``.dev20260101``, ``+git1a2b``) are dropped,
    so ``"3.6.0rc1"`` parses as ``(3, 6, 0)``. Raises ValueError when the string does not start
    with a number.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if match is None:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _pad(version: tuple[int, ...], width: int) -> tuple[int, ...]:
    return version + (0,) * (width - len(version))


def check_version(package: str, installed: str, minimum: tuple[int, ...]) -> None:
    """Raise ImportError when ``installed`` is older than ``minimum``; a version that cannot be parsed passes."""
    try:
        have = parse_version(installed)
    except ValueError:
        return
    width = max(len(have), len(minimum))
    if _pad(have, width) < _pad(minimum, width):
        need = ".".join(str(part) for part in minimum)
        raise ImportError(
            f"flash_tt_attn needs {package} >= {need}, but {package} {installed} is installed. "
            f"Upgrade it (pip install -U '{package}>={need}'), or set FLASH_TT_ATTN_SKIP_VERSION_CHECK=1 "
            "to try this older version at your own risk."
        )


def _installed_triton() -> str | None:
    for dist in _TRITON_DISTS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def env_flag(name: str) -> bool:
    """An environment variable set to 1/true/yes/on."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def check_versions() -> None:
    """Check the installed torch and triton against :data:`MIN_TORCH` and :data:`MIN_TRITON`.

    A missing triton is not an error here: CPU tensors still run the PyTorch reference, and
    the Triton path raises its own ModuleNotFoundError when it is first used.
    """
    if env_flag("FLASH_TT_ATTN_SKIP_VERSION_CHECK"):
        return
    import torch  # imported here so that this module stays cheap to import for its unit tests

    check_version("torch", str(torch.__version__), MIN_TORCH)
    triton_version = _installed_triton()
    if triton_version is not None:
        check_version("triton", triton_version, MIN_TRITON)


check_versions()
