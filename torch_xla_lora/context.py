"""The batch context: which adapter slot each token uses, shared by every LoRA layer.

The handle that :func:`torch_xla_lora.patch_model` returns owns one context;
its layers only read it. Slot indices are built on the host once per batch and
sent to the device as one whole int32 tensor (TPUs have no 64-bit integer
units; a whole-tensor transfer, unlike a slice write into a device buffer,
adds no op to the graph), so a new adapter mix reuses the compiled graph.
"""

from __future__ import annotations

import torch

from torch_xla_lora.errors import ShapeError


class BatchContext:
    """Per-row or per-token adapter slots of the current batch (-1 = base model).

    Attributes:
      slots: int32 device tensor, [B] per batch row or [N] per flattened token;
        None when no batch was set (every layer then returns its base output).
      per_token: whether ``slots`` is per flattened token.
      metadata: (tokens, in_features, out_features) -> int32 device tensor: the
        kernels' token grouping built on the host for this batch (may be empty);
        (tokens, in_features, out_features, "linear", has_bias) for ``linear_lora``'s
        kernel where its plan differs (see ``ops.batch_metadata``).
      rows: with a memory budget, the int32 device table of each lane's pool rows
        ([max_loras * max_rank], see :mod:`torch_xla_lora.pool`); slots are lanes then.
      pages: with a memory budget on one device, the int32 device page table of ``rows``
        ([max_loras * pages(max_rank) + max_loras]: each lane's page starts, then its true rank,
        ``pool.page_table``), built on the host with it: what the pooled kernel reads in place of ``rows``.
      module_ranks: with a memory budget, int32 [K, max_loras]: each lane's adapter's rank in each pair of
        factors of each layer (row ``layer.rank_rows[suffix]``; 0 where the adapter does not target the
        module), by which a layer cuts ``rows`` to its own true ranks (``BaseLayerWithLoRA._pool_tables``).
    """

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.per_token = False
        self.metadata: dict[tuple, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.pages: torch.Tensor | None = None
        self.module_ranks: torch.Tensor | None = None

    def set(
        self,
        slots: torch.Tensor | None,
        per_token: bool,
        metadata: dict[tuple, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
        pages: torch.Tensor | None = None,
        module_ranks: torch.Tensor | None = None,
    ) -> None:
        self.slots, self.per_token, self.metadata, self.rows = slots, per_token, metadata or {}, rows
        self.pages, self.module_ranks = pages, module_ranks

    def token_slots(self, x: torch.Tensor) -> torch.Tensor | None:
        """Slot of every token of ``x`` ([..., D], flattened to [N, D]): [N] int32, or None."""
        slots = self.slots
        if slots is None:
            return None
        num_tokens = x.numel() // x.shape[-1]
        if self.per_token:
            if slots.shape[0] != num_tokens:
                raise ShapeError(
                    f"set_token_adapters gave {slots.shape[0]} tokens, but a layer received {num_tokens} "
                    f"(input shape {tuple(x.shape)})"
                )
            return slots
        rows = slots.shape[0]
        # [rows * S, D] is accepted too: MoE blocks flatten the rows before their router, experts and shared experts.
        flattened = x.dim() == 2 and x.shape[0] % rows == 0
        if x.dim() < 2 or (x.shape[0] != rows and not flattened) or num_tokens % rows:
            raise ShapeError(
                f"set_batch gave {rows} rows, but a layer received input of shape {tuple(x.shape)} "
                f"(expected [{rows}, ..., D] or flattened [{rows} * S, D])"
            )
        return slots[:, None].expand(rows, num_tokens // rows).reshape(num_tokens)
