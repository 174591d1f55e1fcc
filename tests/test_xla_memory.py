"""The XLA-native fused op's compiled temporaries stay near one float32 [T, Dout] buffer.

XLA:CPU gives all the temporaries of a compiled function one allocation (those of
every branch of a ``lax.switch`` included), made on every call; above glibc's mmap
threshold (32 MiB) each call then maps and page-faults it anew (docs/performance.md).
A branch that keeps a second [T, Dout] buffer alive, as the sorted branch once did
(``python -m torch_xla_lora.bench xla_memory --commit 28967df``: about 2x), doubles
that allocation for every shape. The bound is the output's own size, computed here.
"""

from torch_xla_lora.bench import xla_memory


def test_fused_op_temporaries_hold_one_output_sized_buffer():
    tokens, width, rank, slots = 1024, 1024, 16, 8
    sizes = xla_memory.measure(tokens, width, width, rank, slots, "float32")
    output = tokens * width * 4
    assert sizes["output"] == output  # the analysis read the function measured
    assert sizes["temp"] < 1.5 * output, sizes
