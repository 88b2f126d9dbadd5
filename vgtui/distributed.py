"""Norms of sharded tensors (FSDP2 ``fully_shard``, DTensor) without gathering them.

A gradient monitor that takes each rank's local shard for the whole tensor reports norms that are
too small by about √(shards); one that calls ``full_tensor()`` gathers every weight and gradient
to every rank. Neither is needed: a tensor's squared 2-norm is the sum of its pieces' squared
norms. Every rank squares its local shards, a vector of those sums (one entry per tensor, plus
anything else the caller wants summed over ranks) crosses the wire in **one** ``all_reduce``, and
every rank holds the exact norms of the unsharded tensors.

A piece held by several ranks (a ``Replicate`` placement, e.g. the replica dimension of HSDP, or a
plain tensor that every rank holds in full) is counted on one rank of its replica group only.
``Partial`` placements (values still to be summed across ranks) are refused: the norm of a sum
is not the sum of norms, and reading them would give silently wrong numbers. Tensor parallelism
(``Shard`` placements on a model's weights from ``parallelize_module``) is the same case as FSDP2
for these functions; the activations of a tensor-parallel layer are not batch-sharded, so the
data-parallel reduction of ‖∂L/∂h‖ below does not apply to them.

Pure functions: no vgtui state, no host synchronisation (the results stay on the device).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["counted_pieces", "is_sharded", "local_piece", "local_sq_norms", "piece_sq_norms", "reduce_sum", "sharded_sq_norms", "sharding_kind"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch builds without distributed
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 parameters and their gradients are)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_piece(tensor: torch.Tensor, group=None) -> tuple[torch.Tensor, bool]:
    """(this rank's piece of ``tensor`` as a plain tensor, whether this rank counts it).

    DTensor: its local shard; counted unless a ``Replicate`` mesh dimension holds a copy of it on
    a lower coordinate. Plain tensor inside an initialised process group: held in full by every
    rank, so counted on the group's first rank only. Raises ``ValueError`` on ``Partial``."""
    if is_sharded(tensor):
        mesh = tensor.device_mesh
        counts = True
        for dim, placement in enumerate(tensor.placements):
            if placement.is_partial():
                raise ValueError(f"a DTensor with placements {tuple(tensor.placements)} holds partial sums: "
                                 "its norm is not the sum of its pieces' norms (redistribute it first)")
            if placement.is_replicate() and mesh.get_local_rank(dim) != 0:
                counts = False
        return tensor.to_local(), counts
    if dist.is_available() and dist.is_initialized():
        return tensor, dist.get_rank(group) == 0
    return tensor, True


def local_sq_norms(tensors: Sequence[torch.Tensor | None], group=None) -> torch.Tensor:
    """(len(tensors),) float64 on the tensors' device: this rank's share of each tensor's squared
    2-norm (0 for ``None`` and for pieces another rank counts). Summed over the ranks of
    ``group`` (see :func:`reduce_sum`) it is the squared norm of each whole tensor."""
    pieces, where = [], []
    device = None
    for i, tensor in enumerate(tensors):
        if tensor is None:
            continue
        piece, counts = local_piece(tensor.detach(), group)
        if device is None:
            device = piece.device
        if counts:
            pieces.append(piece)
            where.append(i)
    zero = torch.zeros((), dtype=torch.float64, device=device if device is not None else "cpu")
    values = [zero] * len(tensors)
    if pieces:
        # float32 norms even for bf16 pieces (one fused kernel per device and dtype), squared in
        # float64; placed by stacking, not by an index tensor (a host-to-device copy).
        for i, norm in zip(where, torch._foreach_norm(pieces, 2, dtype=torch.float32)):
            values[i] = norm.double().square()
    return torch.stack(values) if values else zero.new_zeros(0)


def counted_pieces(tensors: Sequence[torch.Tensor], group=None) -> tuple[list[torch.Tensor], list[bool]]:
    """Each tensor's local piece as a plain tensor and whether this rank counts it (see
    :func:`local_piece`): for callers that keep pieces (a copy of the weights before a step) and
    take their norms later with :func:`piece_sq_norms`."""
    pairs = [local_piece(t.detach(), group) for t in tensors]
    return [p for p, _ in pairs], [c for _, c in pairs]


def piece_sq_norms(pieces: Sequence[torch.Tensor], counted: Sequence[bool]) -> torch.Tensor:
    """(len(pieces),) float64: the squared 2-norm of each plain local piece, 0 where this rank
    does not count it. One fused norm kernel; no index tensor (no host-to-device copy)."""
    if not pieces:
        return torch.zeros(0, dtype=torch.float64)
    norms = torch._foreach_norm(list(pieces), 2, dtype=torch.float32)
    zero = torch.zeros((), dtype=torch.float64, device=pieces[0].device)
    return torch.stack([n.double().square() if c else zero for n, c in zip(norms, counted)])


def reduce_sum(parts: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum each tensor of ``parts`` over the ranks of ``group`` with ONE ``all_reduce`` (they are
    packed into a single float64 vector and split back, shapes kept). Without an initialised
    process group it returns them as they are (float64)."""
    flat = torch.cat([p.reshape(-1).double() for p in parts])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset:offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    return out


def sharded_sq_norms(tensors: Sequence[torch.Tensor | None], group=None) -> torch.Tensor:
    """(len(tensors),) float64: the squared 2-norm of each whole tensor (sharded or not), the same
    on every rank, from one ``all_reduce`` and no gather. ``group`` must span the DTensors' mesh
    (default: the world)."""
    return reduce_sum([local_sq_norms(tensors, group)], group)[0]


def sharding_kind(model: torch.nn.Module) -> str:
    """How ``model``'s trainable parameters are distributed: ``"none"`` (no DTensor), ``"fsdp"``
    (FSDP2: every DTensor parameter managed by ``fully_shard``, sharded on dim 0 only),
    ``"hsdp"`` (the same with a replicated mesh dimension), or ``"tensor_parallel"`` (anything
    else: a DTensor parameter outside ``fully_shard``, sharded on another dim or on two mesh
    dims). The first three shard only the weights and keep the batch split over ranks, so
    activation sums combine over ranks as under DDP; tensor parallelism splits activations by
    feature, which that reduction would get wrong, so a monitor must refuse it."""
    params = [p for p in model.parameters() if p.requires_grad and is_sharded(p)]
    if not params:
        return "none"
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return "tensor_parallel"
    managed = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    replicated = False
    for p in params:
        shards = [pl for pl in p.placements if pl.is_shard()]
        if id(p) not in managed or len(shards) > 1 or any(pl.dim != 0 for pl in shards):
            return "tensor_parallel"
        replicated = replicated or any(pl.is_replicate() for pl in p.placements)
    return "hsdp" if replicated else "fsdp"
