"""Routing plan: the picks of one routed step sorted by module, built on the device with no host sync.

Index legend: T tokens, K picks per token, E modules (SKIP = id E), P = T*K flattened picks,
p = t*K + k a pick, s a position in module-sorted order, S = number of non-SKIP picks (on device).

    sorted_pick[s]  = p, stable sort of ids.flatten() by module; SKIP (and any id outside
                      0..E-1) lands after offsets[E] and is never computed
    offsets[e]      = first sorted position of module e; offsets[E] = S            [E+1] int32
    counts[e]       = offsets[e+1] - offsets[e]                                     [E]   int32
    tile schedule   (for a tile height BLOCK_M): tile i covers sorted rows
                    [tile_row_start[i], min(tile_row_start[i] + BLOCK_M, offsets[m+1])) of
                    module m = tile_module[i]; only the tiles that exist are real, the grid is
                    sized by the host-side upper bound ceil(P / BLOCK_M) + E and spare tiles have
                    tile_module = E (their programs exit at once).

The combine needs nothing more: kernels write pick p's row to slot p of a [P, N] buffer (or to
token row p // K when K == 1) and the combine sums the K slots of a token in fp32, masking SKIP.

One plan serves every routed GEMM of a step that uses the same ids (the QKV and the output
projection of a routed attention step): build it once with `make_plan(ids, n_modules)` and pass
it as `plan=` to `routed_linear` / `routed_ffn`. Everything here is deterministic (stable sort,
counting sort in three Triton launches, see `route.py`; `make_plan_torch` is the same plan in plain torch
ops, the reference).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["RoutingPlan", "make_plan", "make_plan_torch", "default_block_m"]


def default_block_m(device: torch.device) -> int:
    """Tile height the grouped GEMMs use: 128 on a GPU (a tensor-core tile; one module per tile;
    MOM_KERNELS_BLOCK_M overrides it for tuning), 16 under the CPU interpreter (smallest tl.dot tile,
    keeps the interpreter fast)."""
    if torch.device(device).type == "cuda":
        return int(os.environ.get("MOM_KERNELS_BLOCK_M", "128"))
    return 16


@dataclass(frozen=True)
class RoutingPlan:
    """Module-sorted picks of one routed step (see the module docstring for the format)."""

    n_tokens: int  # T
    top_k: int  # K
    n_modules: int  # E
    block_m: int  # tile height of the schedule
    sorted_pick: torch.Tensor  # [P] int32, pick index p = t*K + k in module-sorted order
    offsets: torch.Tensor  # [E+1] int32, start of each module's rows in sorted order; offsets[E] = S
    tile_module: torch.Tensor  # [n_tiles] int32, module of each tile (E = spare tile)
    tile_row_start: torch.Tensor  # [n_tiles] int32, first sorted row of each tile
    source: Optional[tuple] = None  # (data_ptr, version) of the ids it was built from (see `built_from`)

    def built_from(self, ids: torch.Tensor) -> bool:
        """False when this plan was built from another ids tensor, or from ids changed in place since (a host
        check of the tensor's identity and version counter, no sync; True when the plan does not know)."""
        return self.source is None or self.source == _identity(ids)

    @property
    def counts(self) -> torch.Tensor:
        """[E] int32 rows per module (computed on access: the kernels read offsets only)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def n_tiles(self) -> int:
        """Host-side upper bound on the number of tiles (the grid size), ceil(P / BLOCK_M) + E."""
        return self.tile_module.numel()

    @property
    def device(self) -> torch.device:
        return self.sorted_pick.device

    def tensors(self):
        """The plan's tensors in the order the custom ops take them."""
        return self.sorted_pick, self.offsets, self.tile_module, self.tile_row_start


def _identity(ids: torch.Tensor) -> Optional[tuple]:
    """What a plan remembers of the ids it was built from; None for a fake tensor (shape propagation under
    FakeTensorMode or torch.compile), which has no storage to name."""
    if isinstance(ids, FakeTensor):
        return None
    return (ids.data_ptr(), ids._version, tuple(ids.shape), ids.dtype)


def _check_plan_args(ids, n_modules, block_m):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, K], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    if isinstance(n_modules, bool) or not isinstance(n_modules, int) or n_modules < 1:
        raise ValueError(f"n_modules must be an int >= 1, got {n_modules!r}")
    if block_m is not None and (isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1
                                or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two >= 1 (a tile height), got {block_m!r}")


def make_plan(ids: torch.Tensor, n_modules: int, block_m: int | None = None) -> RoutingPlan:
    """Build the routing plan of picks `ids` [T, K] (values 0..n_modules-1, n_modules = SKIP).

    Three Triton launches on ids' device (a stable counting sort, `route.plan_from_ids`), no host
    synchronisation. Ids outside 0..n_modules are not checked here (that needs a sync; the functionals
    check on CPU or when asked, see `mom_kernels.checks`): they are dropped like SKIP.
    """
    _check_plan_args(ids, n_modules, block_m)
    from . import route  # noqa: F401  (registers the op; route.py imports RoutingPlan from here)

    T, K = ids.shape
    block_m = int(block_m or default_block_m(ids.device))
    sorted_pick, offsets, tile_module, tile_row_start = torch.ops.mom_kernels.make_plan(ids, n_modules, block_m)
    return RoutingPlan(n_tokens=T, top_k=K, n_modules=n_modules, block_m=block_m, sorted_pick=sorted_pick,
                       offsets=offsets, tile_module=tile_module, tile_row_start=tile_row_start,
                       source=None if torch.compiler.is_compiling() else _identity(ids))


def make_plan_torch(ids: torch.Tensor, n_modules: int, block_m: int | None = None) -> RoutingPlan:
    """`make_plan` in plain torch ops (a stable radix sort, searchsorted, cumsum): the reference the
    Triton plan is tested against; also traceable by torch.compile."""
    _check_plan_args(ids, n_modules, block_m)
    T, K = ids.shape
    E = int(n_modules)
    block_m = int(block_m or default_block_m(ids.device))
    dev = ids.device
    P = T * K
    flat = ids.reshape(-1)  # [P]
    # ids outside 0..E-1 (SKIP, or invalid) all get key E so they sort after every module. int32 keys: a
    # radix sort makes 4 passes over them (8 for int64). Everything after the sort stays in int32, with no
    # conversions: each torch op here is a kernel launch on the host's critical path.
    key = torch.where((flat >= 0) & (flat < E), flat, E).to(torch.int32)
    sorted_key, sorted_pick = torch.sort(key, stable=True)  # [P], [P]
    bounds = torch.arange(E + 1, device=dev, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)  # [E+1] first position with key >= e
    counts = offsets[1:] - offsets[:-1]  # [E]
    # tile schedule: module e owns ceil(counts[e] / BLOCK_M) consecutive tiles
    n_tiles = (P + block_m - 1) // block_m + E  # host-side upper bound, no sync
    tiles = (counts + (block_m - 1)) // block_m  # [E]
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)  # [E] one past each module's last tile
    i = torch.arange(n_tiles, device=dev, dtype=torch.int32)  # [n_tiles]
    tile_module = torch.searchsorted(tile_end, i, right=True, out_int32=True)  # [n_tiles] in 0..E (E = spare)
    m = tile_module.clamp(max=E - 1)
    tile_row_start = offsets[m] + (i - (tile_end - tiles)[m]) * block_m
    return RoutingPlan(
        n_tokens=T, top_k=K, n_modules=E, block_m=block_m,
        sorted_pick=sorted_pick.to(torch.int32), offsets=offsets,
        tile_module=tile_module, tile_row_start=tile_row_start,
    )
