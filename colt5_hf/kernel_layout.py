"""What the Triton kernels share: Triton itself, the custom ops' namespace, constants and the layout of a row.

The kernels are custom ops (see OP_NAMESPACE) with fake and autograd registrations, so that everything traces into one
torch.compile graph with no graph break and CUDA graphs can capture it: no host synchronisation, outputs allocated on
the device. Each kernel family has its own module (coordinate_descent_kernel.py, top_k_kernel.py,
bucket_sums_kernel.py, heavy_bias_gradient_kernel.py), imported by the model inside a guard: without Triton they raise
ImportError here and the eager reference path runs.
"""

import re

# Imported in a try: Transformers' Hub loader demands that every import of custom code outside one be installed.
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the CUDA kernels of colt5_hf need Triton") from error


# A Hub custom-code copy of these files is imported under another package name, possibly next to colt5_hf itself: it
# registers its ops under its own namespace rather than failing on names already taken.
PACKAGE = __name__.rpartition(".")[0]
OP_NAMESPACE = "colt5" if PACKAGE == "colt5_hf" else "colt5_" + re.sub(r"\W", "_", PACKAGE)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
RESIDENT_ROW = 16384  # longest row the row kernels (coordinate descent, top-k) keep in registers


def row_layout(n):
    """(BLOCK, NUM_CHUNKS, num_warps) of a kernel holding one row of n tokens per program."""
    if n <= RESIDENT_ROW:
        block = max(triton.next_power_of_2(n), 128)
        return block, 1, min(16, max(4, block // 1024))
    return 4096, triton.cdiv(n, 4096), 16
