"""Per-sample moving-average estimators ``u`` of GCL/HGCL, sharded over ranks by sample id.

Ownership: sample ``id`` lives on rank ``id % W`` at local slot ``id // W`` (``W`` ranks in the
loss's group), so a rank stores O(n/W) entries for a corpus of ``n`` samples. The table holds
``log u`` for each direction (image anchors, text anchors) and grows on demand up to the largest
slot it has seen. In a step, the ``(id, log g)`` of the global batch are all-gathered (a few bytes per
sample; unlike ``all_to_all``, no rank opens a connection to every other); each owner computes the new
``log u`` of its samples, one all-reduce of the global batch's values (zero where another rank owns the
sample) returns every rank its own, and the owner stores them only when the loss commits the step: a global batch that is not finite anywhere (NaN
features of one rank reach every anchor through the ring) must leave the table as it was, or every
later batch with one of its samples would be NaN too.
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuneclip_ds.losses.ring import GroupInfo, all_reduce_max, all_reduce_sum


@dataclass(frozen=True)
class PendingUpdate:
    """New ``log u`` [n, directions] of the ``slots`` [n] this rank owns, computed in one step, not yet stored."""

    slots: torch.Tensor
    log_u: torch.Tensor
    owned: torch.Tensor | None = None  # [n]: the rows of samples this rank owns (None: all)


class EstimatorTable:
    """``log u`` [slots, directions] for the samples this rank owns, and which of them were seen."""

    def __init__(self, num_directions: int = 2):
        self.num_directions = num_directions
        self.log_u: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self._layout: tuple[int, int] | None = None  # (rank, world size) the slots are laid out for

    def update(
        self, ids: torch.Tensor, log_g: torch.Tensor, gamma: float, info: GroupInfo
    ) -> tuple[torch.Tensor, PendingUpdate]:
        """Move ``u`` of the samples ``ids`` [b] towards ``g`` (``log_g`` [b, directions]): the new
        ``log u`` [b, directions], u <- (1 - gamma) u + gamma g, or u <- g for a sample not seen before,
        and the update that ``commit`` stores. Collective over the group. A sample present twice in
        the global batch gets both updates from its old value; the table keeps one of them."""
        self._check_layout(info)
        if info.world_size == 1:
            if ids.numel():
                self._ensure_table(int(ids.max()) + 1, log_g)
            owned_log_u = self._update_owned(ids, log_g, gamma)
            return owned_log_u, PendingUpdate(ids, owned_log_u)
        global_ids, global_log_g = _all_gather(ids, info), _all_gather(log_g, info)
        mine = global_ids % info.world_size == info.rank
        slots = self._owned_slots(global_ids, mine, info.world_size, global_log_g)
        owned_log_u = torch.where(mine[:, None], self._update_owned(slots, global_log_g, gamma), 0.0)
        local = slice(info.rank * len(ids), (info.rank + 1) * len(ids))
        log_u = all_reduce_sum(owned_log_u.clone(), info)[local]  # each sample's value from its owner alone
        return log_u, PendingUpdate(slots, owned_log_u, mine)

    def _owned_slots(self, ids: torch.Tensor, mine: torch.Tensor, world_size: int, like: torch.Tensor):
        """The slots of the samples of ``ids`` this rank owns, and for the others the table's last slot, which
        no sample uses: their updates are dropped there (the table grows to keep it last)."""
        self._ensure_table(int((ids // world_size).max()) + 2, like)
        return torch.where(mine, ids // world_size, self.log_u.shape[0] - 1)

    def commit(self, update: PendingUpdate, accept: torch.Tensor) -> None:
        """Store ``update`` if ``accept`` (a bool tensor; every rank of the group must pass the same value,
        e.g. from an all-reduced flag), else leave the table as it was. Decided on the device: no host
        synchronisation."""
        if update.slots.numel() == 0:
            return
        slots = update.slots.to(self.log_u.device)
        accept = accept.to(self.log_u.device)
        self.log_u[slots] = torch.where(accept, update.log_u.to(self.log_u), self.log_u[slots])
        self.seen[slots] |= accept if update.owned is None else accept & update.owned.to(accept.device)

    def log_mean_u(self, info: GroupInfo, device: torch.device) -> float:
        """``log`` of the mean of ``u`` over every seen sample and direction of the whole table (collective;
        -inf while empty): one number whose change per step says whether the estimators have settled."""
        self._check_layout(info)
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        log_u = empty if self.log_u is None else self.log_u[self.seen].to(device, torch.float64)
        shift = all_reduce_max(log_u.max().reshape(1) if log_u.numel() else empty.new_full((1,), -math.inf), info)
        if not math.isfinite(shift.item()):
            return -math.inf
        sums = all_reduce_sum(torch.stack([torch.exp(log_u - shift).sum(), empty.new_tensor(log_u.numel())]), info)
        return shift.item() + math.log(sums[0].item() / sums[1].item())

    def reset(self) -> None:
        """Forget every estimate: each sample takes its next ``g`` as if seen for the first time."""
        if self.seen is not None:
            self.seen.zero_()

    def state_dict(self, info: GroupInfo) -> dict[str, torch.Tensor]:
        """The seen samples this rank owns: ``ids`` [m] and their ``log_u`` [m, directions], on CPU."""
        self._check_layout(info)
        if self.log_u is None:
            return {"ids": torch.empty(0, dtype=torch.int64), "log_u": torch.empty(0, self.num_directions)}
        slots = self.seen.nonzero().squeeze(1)
        return {"ids": (slots * info.world_size + info.rank).cpu(), "log_u": self.log_u[slots].cpu()}

    def load_state_dict(self, states: Mapping | Iterable[Mapping], info: GroupInfo) -> None:
        """Replace the table by the entries this rank owns among ``states``: one state dict or the
        state dicts of all ranks of a run with any world size (read one at a time)."""
        self.log_u = self.seen = None
        self._layout = None
        self._check_layout(info)
        for state in [states] if isinstance(states, Mapping) else states:
            owned = state["ids"] % info.world_size == info.rank
            slots = state["ids"][owned] // info.world_size
            if slots.numel():
                self._store(slots, state["log_u"][owned])

    def _check_layout(self, info: GroupInfo) -> None:
        layout = (info.rank, info.world_size)
        if self._layout is None:
            self._layout = layout
        elif self._layout != layout:
            raise RuntimeError(f"estimators laid out for (rank, world size) {self._layout}, used with {layout}")

    def _update_owned(self, slots: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
        """The new ``log u`` of the owned ``slots`` (in the table; nothing is stored)."""
        if slots.numel() == 0:
            return log_g
        averaged = torch.logaddexp(self.log_u[slots] + _log(1.0 - gamma), log_g + _log(gamma))
        return torch.where(self.seen[slots, None], averaged, log_g)

    def _store(self, slots: torch.Tensor, log_u: torch.Tensor) -> None:
        self._ensure_table(int(slots.max()) + 1, log_u)
        slots = slots.to(self.log_u.device)
        self.log_u[slots] = log_u.to(self.log_u)
        self.seen[slots] = True

    def _ensure_table(self, size: int, like: torch.Tensor) -> None:
        """A table of at least ``size`` slots on the device (and in the dtype) of ``like``."""
        if self.log_u is None:
            self.log_u = like.new_zeros(0, self.num_directions)
            self.seen = torch.zeros(0, dtype=torch.bool, device=like.device)
        self.log_u = self.log_u.to(like)
        self.seen = self.seen.to(like.device)
        capacity = self.log_u.shape[0]
        if size > capacity:
            extra = max(size, 2 * capacity) - capacity  # doubling: amortised O(1) growth
            self.log_u = torch.cat([self.log_u, self.log_u.new_zeros(extra, self.num_directions)])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(extra)])


def _all_gather(tensor: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """The group's ``tensor`` [b, ...] in rank order, [W * b, ...] (every rank the same ``b``)."""
    gathered = tensor.new_empty((info.world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=info.group)
    return gathered


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf
