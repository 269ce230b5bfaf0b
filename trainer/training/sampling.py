"""The multitask batch sampler: every batch holds one task; tasks are mixed by a strategy.

Indices are global over the tasks' datasets laid end to end (task t owns
``offsets[t] : offsets[t] + sizes[t]``). An epoch is as many steps as one pass over every
task's data takes; the strategy decides how many of those steps go to each task and in what
order. The schedule depends only on (seed, epoch), so it is identical on every rank of a
distributed job (all ranks train the same task at each step) and reproducible after a
restart; each rank takes a disjoint shard of every task, as `DistributedSampler` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..config import ConfigError

STRATEGIES = ("proportional", "temperature", "uniform", "round_robin", "weights")
_MEGABATCH = 50  # batches per length-sorted megabatch, as in transformers' LengthGroupedSampler


def mixing_weights(
    sizes: Sequence[int], strategy: str, *, temperature: float = 2.0, cap: int | None = None,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Probability of each task per step under `strategy`.

    Raises:
        ValueError: an unknown strategy, a temperature that is not > 0, or weights that do not match.
    """
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if cap is not None:
        sizes_arr = np.minimum(sizes_arr, cap)
    if strategy == "proportional":
        w = sizes_arr
    elif strategy == "temperature":
        if not temperature > 0:
            raise ValueError(f"the sampling temperature must be > 0, got {temperature!r}")
        # size ** (1/T) overflows to inf (and inf/inf is nan) or underflows for a small T. The
        # ratios to the largest task, (size / largest) ** (1/T), taken in log space, lie in
        # [0, 1] for any T > 0; the largest task's is 1, so the sum is never 0.
        with np.errstate(divide="ignore", over="ignore", under="ignore"):  # -inf and 0 are the limits
            log_sizes = np.log(sizes_arr)
            w = np.exp((log_sizes - log_sizes.max()) / temperature)
    elif strategy in ("uniform", "round_robin"):
        w = np.ones_like(sizes_arr)
    elif strategy == "weights":
        if weights is None or len(weights) != len(sizes):
            raise ValueError("strategy 'weights' needs one weight per task")
        w = np.asarray(weights, dtype=np.float64)
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return w / w.sum()


def apportion(total: int, p: np.ndarray) -> list[int]:
    """Split `total` steps by probabilities `p` (largest remainder, ties to the earlier task)."""
    raw = p * total
    counts = np.floor(raw).astype(int)
    order = sorted(range(len(p)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class MultitaskBatchSampler(Sampler[list[int]]):
    """Yields lists of global indices, one task per batch, for rank `rank` of `num_replicas`.

    Args:
        sizes: examples per task.
        batch_sizes: per-device batch size per task.
        strategy: proportional | temperature | uniform | round_robin | weights.
        lengths: optional per-task token lengths; with `group_by_length`, batches hold
            examples of similar length (shuffled megabatches sorted by length).
        limit: optional ``(epoch, batches per epoch) -> number of batches or None``: the epoch ends after that many
            batches (the run's last step falls inside it), so nothing is drawn past the end of
            training, also when a resume starts there.
        names: optional task names, for error messages.

    Raises:
        ValueError: inconsistent sizes, batch sizes, rank or strategy.
        ConfigError: the strategy leaves a task without a single step of an epoch (a tiny
            SAMPLING_TEMPERATURE or task weight): the schedule is the same every epoch, so that
            task would never train.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_sizes: Sequence[int],
        *,
        strategy: str = "proportional",
        temperature: float = 2.0,
        cap: int | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: Sequence[Sequence[int]] | None = None,
        group_by_length: bool = False,
        drop_last: bool = False,
        limit=None,
        names: Sequence[str] | None = None,
    ):
        if len(sizes) != len(batch_sizes) or not sizes:
            raise ValueError("need one batch size per task and at least one task")
        if any(n < 1 for n in sizes):
            raise ValueError(f"every task needs at least one example, got sizes {list(sizes)}")
        if any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.sizes = list(sizes)
        self.batch_sizes = list(batch_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int).tolist()
        self.strategy = strategy
        self.probabilities = mixing_weights(sizes, strategy, temperature=temperature, cap=cap, weights=weights)
        # The knobs that shape this strategy's mix (the others are ignored by it), for `describe`.
        self.settings = ({"temperature": temperature, "cap": cap} if strategy == "temperature" else
                         {"weights": list(weights)} if strategy == "weights" else {})
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.lengths = [np.asarray(x) for x in lengths] if lengths is not None else None
        self.group_by_length = group_by_length and lengths is not None
        self.drop_last = drop_last
        self.limit = limit
        self.epoch = 0
        self.batch_size = max(self.batch_sizes)  # read by tools that inspect samplers
        self._check_every_task_trains(names, temperature, weights)

    def _check_every_task_trains(self, names: Sequence[str] | None, temperature: float,
                                 weights: Sequence[float] | None) -> None:
        counts, steps = self.steps_per_task(), len(self)
        for task, count in enumerate(counts):
            if count:
                continue
            who = f"task {names[task]!r}" if names is not None else f"task #{task}"
            share = f"no step of an epoch (0 of {steps}; probability {self.probabilities[task]:.3g}), so it would never train"
            if self.strategy == "temperature":
                raise ConfigError(f"SAMPLING_TEMPERATURE={temperature:g} is not valid: {who} ({self.sizes[task]} examples) "
                                  f"would get {share}; use a larger SAMPLING_TEMPERATURE (1 mixes by task size, "
                                  "larger values approach uniform)")
            if self.strategy == "weights":
                raise ConfigError(f"TASK_WEIGHTS is not valid: {who} (weight {weights[task]:g}) would get {share}; "
                                  "give it a larger weight")
            raise ConfigError(f"SAMPLING={self.strategy} is not valid: {who} would get {share}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the Trainer calls this before iterating (also after a resume)."""
        self.epoch = int(epoch)

    # -- per task ----------------------------------------------------------------------------
    def _per_rank(self, task: int) -> int:
        return math.ceil(self.sizes[task] / self.num_replicas)

    def batches_per_pass(self, task: int) -> int:
        """Batches one pass over `task` takes on each rank."""
        n, bs = self._per_rank(task), self.batch_sizes[task]
        return max(1, n // bs) if self.drop_last else math.ceil(n / bs)

    def _task_pass(self, task: int, cycle: int) -> list[list[int]]:
        """This rank's batches for pass number `cycle` over `task` in the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, task, cycle])
        n = self.sizes[task]
        perm = rng.permutation(n)
        total = self._per_rank(task) * self.num_replicas
        if total > n:  # pad by wrapping so every rank gets as many examples (DistributedSampler does the same)
            perm = np.resize(perm, total)
        mine = perm[self.rank :: self.num_replicas]
        bs = self.batch_sizes[task]
        if self.group_by_length:
            lengths = self.lengths[task]
            mega = bs * _MEGABATCH
            mine = np.concatenate(
                [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.array_split(mine, max(1, math.ceil(len(mine) / mega)))]
            )
        batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < bs:
            batches = batches[:-1]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        offset = self.offsets[task]
        return [(b + offset).tolist() for b in batches]

    # -- schedule ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(self.batches_per_pass(t) for t in range(len(self.sizes)))

    def steps_per_task(self) -> list[int]:
        """How many of an epoch's steps go to each task (the same every epoch and on every rank)."""
        if self.strategy == "proportional":
            return [self.batches_per_pass(t) for t in range(len(self.sizes))]
        return apportion(len(self), self.probabilities)

    def describe(self) -> dict:
        """The plan of an epoch (the same every epoch), on each rank: the strategy and its `settings`;
        `steps`, the batches of an epoch; per task (`tasks`, in order) its `examples`, `batch_size`,
        `batches_per_pass` over its data, `steps` of the epoch, their `share` of the epoch and the
        `passes` over its data they make (above 1: the task repeats within the epoch)."""
        steps, counts = len(self), self.steps_per_task()
        tasks = [{"examples": self.sizes[t], "batch_size": self.batch_sizes[t], "batches_per_pass": self.batches_per_pass(t),
                  "steps": counts[t], "share": counts[t] / steps, "passes": counts[t] / self.batches_per_pass(t)}
                 for t in range(len(self.sizes))]
        return {"strategy": self.strategy, "settings": dict(self.settings), "steps": steps, "tasks": tasks}

    def schedule(self) -> list[int]:
        """Task id of every step of the current epoch (the same on every rank)."""
        steps = len(self)
        n_tasks = len(self.sizes)
        counts = self.steps_per_task()
        if self.strategy == "round_robin":
            order, left = [], list(counts)
            while len(order) < steps:
                for t in range(n_tasks):
                    if left[t]:
                        order.append(t)
                        left[t] -= 1
            return order
        rng = np.random.default_rng([self.seed, self.epoch, 1_000_003])
        return rng.permutation(np.repeat(np.arange(n_tasks), counts)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[int, list[list[int]]] = {}
        cycles = [0] * len(self.sizes)
        schedule = self.schedule()
        limit = self.limit(self.epoch, len(schedule)) if self.limit is not None else None
        if limit is not None:
            schedule = schedule[: max(0, limit)]
        for task in schedule:
            if not pending.get(task):
                pending[task] = self._task_pass(task, cycles[task])
                cycles[task] += 1
            yield pending[task].pop(0)

    def task_of(self, index: int) -> int:
        """Task id owning global index `index`."""
        return int(np.searchsorted(self.offsets, index, side="right") - 1)
