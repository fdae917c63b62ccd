"""Compile the library's kernels for the H100 (sm_90) on a machine without a GPU, as PERF.md's offline
checks do, and report for each whether it compiles (with its shared memory, its two-byte global loads, the
mark of a tile read one element at a time, its registers per thread and spilled bytes as ptxas reports them,
and how many programs an SM then holds) or the compiler's error.

Needs only triton (its NVIDIA backend ships ptxas); torch is not imported, so a small virtual environment
with the GPU's Triton version (3.6) will do. With --warp-specialize every main loop becomes
``tl.range(..., warp_specialize=True)`` (Triton's automatic warp specialization) in a patched copy of the
kernels; docs/performance.md records that Triton 3.6 fails on all four kernels then.

Usage: python experiments/tools/offline_compile.py [--warp-specialize] [--padded-tail] [--length L] [--fold-split-sum]
[--fold-bias-copy] [--kernel NAME ...]
(--help lists the rest)
"""

import argparse
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types

# The interpreter (TRITON_INTERPRET=1, as the CPU tests set it) would hand back interpreted functions, which
# triton.compile cannot compile: this script always compiles.
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "flash_tt_attn" / "kernels"
KERNEL_NAMES = ("forward", "dq", "dkdv", "dbias")
B, H, L, D = 4, 8, 512, 32  # the shipped D = 32 configs: 64×64 tiles, 4 warps, 3 stages, every load pipelined
#: The shipped D = 32 configs' register caps (flash_tt_attn/tuning.py; tests/test_tools.py keeps them equal).
MAX_REGISTERS = {"forward": 168, "dq": None, "dkdv": 168, "dbias": None}
NUM_WARPS = 4
#: The bias gradient's row splits that --fold-split-sum has dk/dv add up (as at B=1 H=4 L=768 D=32, the least).
FOLDED_SPLITS = 2
#: An H100 SM: 65,536 registers (allocated per warp in units of 8 per thread) and 228 KiB of shared memory,
#: of which each resident program takes 1 KiB more than it asks for.
SM_REGISTERS, SM_SHARED_MEMORY, PROGRAM_RESERVED_SHARED = 65536, 228 * 1024, 1024


def load_kernels(directory):
    """forward.py and backward.py of directory, imported as a package (they import .common)."""
    package = types.ModuleType("offline_kernels")
    package.__path__ = [str(directory)]
    sys.modules["offline_kernels"] = package
    modules = {}
    for name in ("common", "forward", "backward"):
        spec = importlib.util.spec_from_file_location(f"offline_kernels.{name}", directory / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules


def integer_args(L=L, key_major_bias=False, bias_width=None, dbias_splits=0, bias_copy=False):
    """Every integer argument's value for contiguous (B, H, L, L, D) tensors; strides of 1 become constexprs
    and multiples of 16 get the divisibility hint, as Triton's JIT does. With key_major_bias the bias has the
    strides of the key-major copy that ops.launch_backward makes for configs with LaunchConfig.key_major_bias
    (the shipped D=32 dk/dv): bias[j, k] at k·width + j. bias_width: the width of the zero-padded copy of the
    bias the kernel reads (ops._padded_bias_width), L when it reads the bias itself. dbias_splits: the row splits
    dk/dv sums the bias gradient over (KernelOptions.fold_split_sum), 0 where it does not (as ops passes).
    bias_copy: dq writes dk/dv's key-major copy of the bias (KernelOptions.fold_bias_copy); its strides and
    width are 0 where it does not, as ops passes them."""
    width = bias_width or L
    values = dict(H=H, R=L, L=L, rows_per_split=L, stride_mb=0, stride_mi=0, stride_mk=0,
                  dbias_elements=B * H * L * L if dbias_splits else 0, dbias_splits=dbias_splits)
    five = (H * L * L * D, L * L * D, L * D, D, 1)
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        for suffix, stride in zip(("b", "h", "i", "j" if t in ("q", "o", "do", "dq") else "k", "d"), five, strict=True):
            values[f"stride_{t}{suffix}"] = stride
    for prefix, names, n_keys in (("b", "bhjk", width), ("l", "bhij", L)):
        for n, stride in zip(names, (H * n_keys * n_keys, n_keys * n_keys, n_keys, 1), strict=True):
            values[f"stride_{prefix}{n}"] = stride
    if key_major_bias:
        values["stride_bj"], values["stride_bk"] = 1, width
    for n, stride in zip("sbhjk", (B * H * L * L, H * L * L, L * L, L, 1), strict=True):
        values[f"stride_p{n}"] = stride
    copy_strides = (H * width * width, width * width, 1, width) if bias_copy else (0, 0, 0, 0)
    for n, stride in zip("bhjk", copy_strides, strict=True):
        values[f"stride_c{n}"] = stride
    values["copy_width"] = width if bias_copy else 0
    return values


def compile_one(fn, constexprs, key_major_bias=False, max_registers=None, length=L):
    pointers = dict(MASK="*u8", EXTENTS="*i32", LSE="*fp32", DELTA="*fp32", DBIAS_PARTIAL="*fp32")
    tile = constexprs["BLOCK_K"]
    ints = integer_args(length, key_major_bias, -(-length // tile) * tile if constexprs.get("BIAS_PADDED") else None,
                        FOLDED_SPLITS if constexprs.get("SUM_SPLITS") else 0, bool(constexprs.get("COPY_BIAS")))
    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name == "scale":
            signature[name] = "fp32"
        elif name.isupper() and name not in ints:  # tensors; H, R, L are integers
            signature[name] = pointers.get(name, "*fp16")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": NUM_WARPS, "num_stages": 3}
    if max_registers is not None:
        options["maxnreg"] = max_registers
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) of the PTX as Triton's ptxas compiles it for sm_90a."""
    from triton.backends.nvidia import compiler as nvidia  # noqa: PLC0415

    try:
        ptxas = nvidia.get_ptxas(90).path  # Triton >= 3.7 picks ptxas per architecture
    except TypeError:
        ptxas = nvidia.get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(source), "-o", str(source.with_suffix(".cubin"))],
                              capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1))
    return registers, spilled


def programs_per_sm(registers: int, shared_memory: int) -> int:
    """Programs of NUM_WARPS warps that one H100 SM holds at once, by registers and by shared memory."""
    by_registers = SM_REGISTERS // (-(-registers // 8) * 8 * 32 * NUM_WARPS)
    return min(by_registers, SM_SHARED_MEMORY // (shared_memory + PROGRAM_RESERVED_SHARED))


def two_byte_global_loads(ptx: str) -> int:
    """The PTX's scalar 16-bit loads from global memory: a 16-bit tile whose load mask Triton cannot prove constant
    over a vector is read one element at a time, unpipelined (PERF.md, v24); the shipped configs have none."""
    return len(re.findall(r"\bld\.global(?:\.[A-Za-z0-9_:]+)*?\.[bu]16\b", ptx))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--warp-specialize", action="store_true",
                    help="compile a copy whose main loops ask for Triton's automatic warp specialization")
    ap.add_argument("--padded-tail", action="store_true",
                    help="compile the variants for a padded tail (lengths=: HAS_EXTENTS, bounds masks on)")
    ap.add_argument("--end-tile-select", action="store_true",
                    help="compile the forward with KernelOptions.end_tile_select (its select only in the end tile)")
    ap.add_argument("--unpadded-bias", action="store_true",
                    help="with bounds masks on, the forward reads the bias masked, as before v27 (KernelOptions."
                         "pad_bias_tiles off); by default it reads a whole-tile copy unmasked, as launches at an L "
                         "the tiles do not divide do")
    ap.add_argument("--padded-bias-backward", action="store_true",
                    help="with bounds masks on, dq and dk/dv read a whole-tile copy of the bias unmasked "
                         "(KernelOptions.pad_bias_tiles_backward, off by default); otherwise masked")
    ap.add_argument("--fold-split-sum", action="store_true",
                    help="compile dk/dv with the bias gradient's split sum folded in (KernelOptions.fold_split_sum, "
                         "off by default)")
    ap.add_argument("--fold-bias-copy", action="store_true",
                    help="compile dq writing dk/dv's key-major copy of the bias (KernelOptions.fold_bias_copy, off "
                         "by default)")
    ap.add_argument("--length", type=int, default=L,
                    help=f"the sequence length L the integer arguments describe (default {L}); at an L the 64-wide "
                         "tiles do not divide, the bounds masks are on, as with --padded-tail")
    ap.add_argument("--kernel", action="append", choices=KERNEL_NAMES,
                    help="compile only this kernel (repeatable); default: all four")
    args = ap.parse_args(argv)
    warp_specialize = args.warp_specialize
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        for f in KERNELS.glob("*.py"):
            text = f.read_text()
            if warp_specialize:
                text = re.sub(r"num_stages=LOOP_STAGES\)", "num_stages=LOOP_STAGES, warp_specialize=True)", text)
            (directory / f.name).write_text(text)
        shutil.rmtree(directory / "__pycache__", ignore_errors=True)
        kernels = load_kernels(directory)
        padded = args.padded_tail
        masked = padded or args.length % 64 != 0  # bounds masks on: a padded tail, or tiles that do not divide L
        common = dict(HAS_MASK=False, HAS_EXTENTS=padded, EVEN_L=not masked, Q_PRESCALED=True,
                      BLOCK_J=64, BLOCK_K=64, HEAD_DIM=D,
                      ACC_DTYPE=tl.float32, DOT_PRECISION="tf32", FAST_EXP2=True, LOOP_STAGES=3)
        cases = {
            "forward": (kernels["forward"].attention_fwd_kernel,
                        dict(ROWS=2, ROW_OFFSET_DTYPE=tl.int32, END_TILE_SELECT=args.end_tile_select,
                             BIAS_PADDED=masked and not args.unpadded_bias)),
            "dq": (kernels["backward"].attention_bwd_dq_kernel,
                   dict(ROWS=1, ROW_OFFSET_DTYPE=tl.int32, SETTLE=True,
                        BIAS_PADDED=masked and args.padded_bias_backward, COPY_BIAS=args.fold_bias_copy)),
            "dkdv": (kernels["backward"].attention_bwd_dkdv_kernel,
                     dict(ROWS=1, ROW_OFFSET_DTYPE=tl.int32, SETTLE=True,
                          BIAS_PADDED=masked and args.padded_bias_backward, SUM_SPLITS=args.fold_split_sum,
                          SUM_BLOCK=1024)),  # ops.SUM_BLOCK
            "dbias": (kernels["backward"].attention_bwd_dbias_kernel, dict(UNSCALED_SCORES=True)),
        }
        for name, (fn, extra) in cases.items():
            if args.kernel and name not in args.kernel:
                continue
            try:
                compiled = compile_one(fn, {**common, **extra}, key_major_bias=name == "dkdv",
                                       max_registers=MAX_REGISTERS[name], length=args.length)
                narrow = two_byte_global_loads(compiled.asm["ptx"])
                registers, spilled = ptxas_usage(compiled.asm["ptx"])
                shared = compiled.metadata.shared
                print(f"{name}: compiled ({shared} bytes of shared memory, {narrow} two-byte global loads, "
                      f"{registers} registers, {spilled} bytes spilled, {programs_per_sm(registers, shared)} "
                      "programs per SM)", flush=True)
            except Exception as error:  # noqa: BLE001 - report every kernel
                print(f"{name}: FAILED ({type(error).__name__}: {str(error).splitlines()[0][:120]})", flush=True)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
