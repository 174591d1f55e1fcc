"""Pallas kernels of torch_xla_lora (installed as ``torch_xla_lora.kernels``).

This package knows about JAX and Pallas only, never about torch. One kernel a
file; block sizes and their tuning table are plain data modules:

- ``block_sizes``: the :class:`BlockSizes` type and how sizes are chosen.
- ``tuning``: the tuning table (data).
- ``visits``: the grouping of tokens into (token block, adapter slot) visits,
  which every kernel's grid walks.
- ``shrink``, ``expand``: the BGMV kernels; ``fused``: the laned shrink-expand;
  ``fused_base``: the base matmul and multi-LoRA in one kernel.
- ``reference``: a plain-jnp loop definition beside the kernels.
"""
