"""Compiles routing.top_k_positions' sort path at 32768 tokens on CUDA (the Triton kernel takes rows up to 16384)."""
import os

import torch

from colt5_hf import routing

DEVICE = os.environ.get("DEVICE", "cuda")

scores = torch.randn(1, 2, 32768, device=DEVICE)
mask = torch.ones(1, 2, 32768, dtype=torch.bool, device=DEVICE)
lengths = mask[:, 0].sum(-1)
fractions = (0.0625, 0.125)


def select(scores, mask, lengths):
    k = torch.cat([(lengths.double() * f - 1e-9).ceil().long().clamp(min=1)[:, None] for f in fractions], 1)
    return routing.top_k_positions(scores, mask, k, 4096)


expected = select(scores, mask, lengths)
compiled = torch.compile(select, fullgraph=True, dynamic=False)
print("compiled equal:", torch.equal(compiled(scores, mask, lengths), expected), flush=True)
