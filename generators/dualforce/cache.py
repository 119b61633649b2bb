"""Per-modality KV cache for autoregressive generation.

One :class:`KVSlot` per (block, stream) holds the rotated keys and values of the last
``window_frames - 1`` committed frames in a ring buffer allocated at the first commit, so
generation memory is fixed from the first frame on and nothing is reallocated per frame.
Softmax attention is invariant to the order of its keys (RoPE is applied before caching),
so the ring's slot order does not matter. Audio needs no cache (cross-modal attention
reads only the current frame); the reference's keys/values are constant per block and kept
in :attr:`DualForceCache.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVSlot:
    """Ring buffer of ``capacity`` frames × ``tokens`` keys/values ``(B, H, tokens, d)``."""

    def __init__(self, capacity_frames: int) -> None:
        self.capacity = capacity_frames
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.filled = 0
        self.next = 0

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cached keys/values of the committed frames (``None`` before the first commit)."""
        if self.keys is None or self.filled == 0 or self.values is None:
            return None, None
        n = self.keys.shape[2] // self.capacity
        return self.keys[:, :, : self.filled * n], self.values[:, :, : self.filled * n]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commit one frame's keys/values, overwriting the oldest once full."""
        if self.capacity == 0:
            return
        b, h, n, d = k.shape
        if self.keys is None or self.values is None:
            self.keys = k.new_empty(b, h, self.capacity * n, d)
            self.values = v.new_empty(b, h, self.capacity * n, d)
        start = self.next * n
        self.keys[:, :, start : start + n] = k
        self.values[:, :, start : start + n] = v
        self.next = (self.next + 1) % self.capacity
        self.filled = min(self.filled + 1, self.capacity)

    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


@dataclass
class DualForceCache:
    """All slots of one generation run: ``video[i]`` / ``struct[i]`` for block ``i``, and the
    per-block reference keys/values ``reference[(i, stream)]`` computed on first use."""

    num_layers: int
    window_frames: int
    video: list[KVSlot] = field(init=False)
    struct: list[KVSlot] = field(init=False)
    reference: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )
    frames_committed: int = 0

    def __post_init__(self) -> None:
        cap = self.window_frames - 1
        self.video = [KVSlot(cap) for _ in range(self.num_layers)]
        self.struct = [KVSlot(cap) for _ in range(self.num_layers)]

    def nbytes(self) -> dict[str, int]:
        """Bytes held per modality (what generation memory beyond the weights consists of)."""
        ref = sum(k.nbytes + v.nbytes for k, v in self.reference.values())
        return {
            "video": sum(s.nbytes() for s in self.video),
            "struct": sum(s.nbytes() for s in self.struct),
            "reference": ref,
        }
