"""Per-sample moving-average estimators ``u`` of GCL/HGCL, sharded over ranks by sample id.

Ownership: sample ``id`` lives on rank ``id % W`` at local slot ``id // W`` (``W`` ranks in the
loss's group), so a rank stores O(n/W) entries for a corpus of ``n`` samples. The table holds
``log u`` for each direction (image anchors, text anchors), and a spare last slot that no sample uses;
it is allocated for the corpus when its size is known (``reserve``), else grows on demand up to the
largest slot it has seen. In a step, the ``(id, log g)`` of the global batch are all-gathered (a few
bytes per sample; unlike ``all_to_all``, no rank opens a connection to every other); each owner
computes the new ``log u`` of its samples, one
all-reduce of the global batch's values (zero where another rank owns the sample) returns every rank
its own, and the owner stores them only when the loss commits the step: a global batch that is not
finite anywhere (NaN features of one rank reach every anchor through the ring) must leave the table
as it was, or every later batch with one of its samples would be NaN too.

A reserved table does not wait for the host in a step (on GPUs the step's kernels then queue without a
break): growing on demand would read the largest id first. An id beyond it (a ``data.num_samples`` too
small) gets the spare slot instead, whose update is dropped: the sample counts as seen for the first time.
The table notes the largest id on the device, and ``make_room``, called where the host waits anyway (the
trainer: after each step), reads it and grows the table, with a warning.
"""

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuneclip_ds.losses.ring import GroupInfo, all_reduce_max, all_reduce_sum

logger = logging.getLogger(__name__)

# log_mean_u reads the table this many values at a time: a chunk's temporaries stay a few MB, where a float64
# copy of the whole table (what the statistic needs in one piece) would take twice the table's memory.
_CHUNK_VALUES = 1 << 20


@dataclass(frozen=True)
class PendingUpdate:
    """New ``log u`` [n, directions] of the ``slots`` [n] this rank owns, computed in one step, not yet stored."""

    slots: torch.Tensor
    log_u: torch.Tensor
    kept: torch.Tensor  # [n] bool: the rows this rank stores (samples it owns that have a slot)


class EstimatorTable:
    """``log u`` [slots, directions] for the samples this rank owns, and which of them were seen."""

    def __init__(self, num_directions: int = 2):
        self.num_directions = num_directions
        self.log_u: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self._layout: tuple[int, int] | None = None  # (rank, world size) the slots are laid out for
        self._reserved_for: int | None = None  # the corpus size the table was allocated for (reserve)
        self._warn_on_growth = False  # rank 0, until it has warned once that the table outgrew the reservation
        self._largest_id: torch.Tensor | None = None  # [] on the device, once reserved: for make_room

    def reserve(self, num_samples: int, info: GroupInfo, device: torch.device, dtype=torch.float32) -> None:
        """Allocate the slots of the ids in [0, ``num_samples``) this rank owns, once, now: otherwise the table
        doubles as new ids arrive during the first epoch, each time holding the old and the new table at once.
        ``dtype``: the loss's compute dtype (float32 for float32, bfloat16 and float16 features). Steps then
        do not wait for the host; an id beyond the corpus grows the table at the next ``make_room``."""
        self._check_layout(info)
        self._ensure_table(slots_for_corpus(num_samples, info.world_size), torch.empty(0, dtype=dtype, device=device))
        self._reserved_for, self._warn_on_growth = num_samples, info.rank == 0
        self._largest_id = torch.full((), -1, dtype=torch.int64, device=device)

    def make_room(self) -> None:
        """Grow a reserved table for the largest id that has reached it (with a warning on rank 0 the first
        time it outgrows the reservation). Reads a number from the device: call it where the host waits for
        the step anyway. Until then the updates of ids beyond the table are dropped (see the module's doc)."""
        if self._largest_id is not None and self._layout is not None:
            self._ensure_table(int(self._largest_id) // self._layout[1] + 2, self.log_u)

    def update(
        self, ids: torch.Tensor, log_g: torch.Tensor, gamma: float, info: GroupInfo
    ) -> tuple[torch.Tensor, PendingUpdate]:
        """Move ``u`` of the samples ``ids`` [b] towards ``g`` (``log_g`` [b, directions]): the new
        ``log u`` [b, directions], u <- (1 - gamma) u + gamma g, or u <- g for a sample not seen before,
        and the update that ``commit`` stores. Collective over the group. A sample present twice in
        the global batch gets both updates from its old value; the table keeps one of them."""
        self._check_layout(info)
        if info.world_size == 1:
            slots, kept = self._owned_slots(ids, None, info.world_size, log_g)
            owned_log_u = self._update_owned(slots, log_g, gamma)
            return owned_log_u, PendingUpdate(slots, owned_log_u, kept)
        global_ids, global_log_g = _all_gather(ids, info), _all_gather(log_g, info)
        mine = global_ids % info.world_size == info.rank
        slots, kept = self._owned_slots(global_ids, mine, info.world_size, global_log_g)
        owned_log_u = torch.where(mine[:, None], self._update_owned(slots, global_log_g, gamma), 0.0)
        local = slice(info.rank * len(ids), (info.rank + 1) * len(ids))
        log_u = all_reduce_sum(owned_log_u.clone(), info)[local]  # each sample's value from its owner alone
        return log_u, PendingUpdate(slots, owned_log_u, kept)

    def _owned_slots(self, ids: torch.Tensor, mine: torch.Tensor | None, world_size: int, like: torch.Tensor):
        """The slots of ``ids`` and which of them this rank keeps: the samples it owns (``mine``; None: all)
        that fit in the table. The others get the spare last slot, where their updates are dropped. An
        unreserved table first grows to fit every id, reading the largest (a host synchronisation); a
        reserved one notes it on the device for ``make_room``."""
        slots = ids // world_size
        if self._largest_id is None:
            self._ensure_table(int(slots.max()) + 2 if ids.numel() else 1, like)
        elif ids.numel():
            torch.maximum(self._largest_id, ids.max(), out=self._largest_id)
        spare = self.log_u.shape[0] - 1
        kept = slots < spare if mine is None else mine & (slots < spare)
        return torch.where(kept, slots, spare), kept

    def commit(self, update: PendingUpdate, accept: torch.Tensor) -> None:
        """Store ``update`` if ``accept`` (a bool tensor; every rank of the group must pass the same value,
        e.g. from an all-reduced flag), else leave the table as it was. Decided on the device: no host
        synchronisation."""
        if update.slots.numel() == 0:
            return
        slots = update.slots.to(self.log_u.device)
        accept = accept.to(self.log_u.device)
        self.log_u[slots] = torch.where(accept, update.log_u.to(self.log_u), self.log_u[slots])
        self.seen[slots] |= accept & update.kept.to(accept.device)

    def log_mean_u(self, info: GroupInfo, device: torch.device) -> float:
        """``log`` of the mean of ``u`` over every seen sample and direction of the whole table (collective;
        -inf while empty): one number whose change per step says whether the estimators have settled. Within
        about 1e-6 of the float64 computation for a float32 table (tests: 1e-5)."""
        self._check_layout(info)
        log_sum, count = self._log_sum_and_count(device)
        shift = all_reduce_max(log_sum.clone(), info)
        if not math.isfinite(shift.item()):
            return -math.inf
        sums = all_reduce_sum(torch.stack([torch.exp(log_sum - shift), count]), info)
        return shift.item() + math.log(sums[0].item() / sums[1].item())

    def _log_sum_and_count(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 ``log`` of the sum of ``u`` over this rank's seen entries, and their number: a log-sum-exp of
        each chunk of the table in its own dtype, the chunks' sums combined in float64 (no host synchronisation)."""
        log_sum = torch.tensor(-math.inf, dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        if self.log_u is None:
            return log_sum, count
        rows = max(1, _CHUNK_VALUES // self.num_directions)
        for start in range(0, self.log_u.shape[0], rows):
            seen = self.seen[start:start + rows]
            seen_log_u = torch.where(seen[:, None], self.log_u[start:start + rows], -math.inf)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(seen_log_u.flatten(), dim=0).to(log_sum))
            count += seen.sum().to(count) * self.num_directions
        return log_sum, count

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
        self.reset()  # the table keeps its allocation (see reserve)
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
        """Store a state dict's ``log_u`` (CPU tensors: reading their largest slot does not wait for a device)."""
        self._ensure_table(int(slots.max()) + 2, log_u if self.log_u is None else self.log_u)  # where it is
        slots = slots.to(self.log_u.device)
        self.log_u[slots] = log_u.to(self.log_u)
        self.seen[slots] = True

    def _ensure_table(self, size: int, like: torch.Tensor) -> None:
        """A table of at least ``size`` slots (the spare last one included) on the device (and in the dtype) of
        ``like``."""
        if self.log_u is None:
            self.log_u = like.new_zeros(0, self.num_directions)
            self.seen = torch.zeros(0, dtype=torch.bool, device=like.device)
        self.log_u = self.log_u.to(like)
        self.seen = self.seen.to(like.device)
        capacity = self.log_u.shape[0]
        if size > capacity:
            self._warn_once_beyond_reservation(capacity)
            extra = max(size, 2 * capacity) - capacity  # doubling: amortised O(1) growth
            self.log_u = torch.cat([self.log_u, self.log_u.new_zeros(extra, self.num_directions)])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(extra)])

    def _warn_once_beyond_reservation(self, capacity: int) -> None:
        if self._reserved_for is not None and self._warn_on_growth:
            logger.warning("a sample id at or beyond the corpus size %d (data.num_samples, or the sum of the "
                           "data.sources' num_samples): the estimator table grows past the %d slots allocated for it, "
                           "by doubling (in training after the step that met such an id, whose estimate that "
                           "step does not keep); set data.num_samples to the corpus size, with ids in "
                           "[0, data.num_samples) (python -m tuneclip_ds.data.shards numbers them so)",
                           self._reserved_for, capacity)
            self._warn_on_growth = False


def slots_for_corpus(num_samples: int, world_size: int) -> int:
    """The table size that holds every id in [0, ``num_samples``) a rank owns: ``ceil(n / W)`` slots, and the
    spare last slot that ``_owned_slots`` drops the other updates into."""
    return -(-num_samples // world_size) + 1


def _all_gather(tensor: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """The group's ``tensor`` [b, ...] in rank order, [W * b, ...] (every rank the same ``b``)."""
    gathered = tensor.new_empty((info.world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=info.group)
    return gathered


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf
