"""trainer.training.sampling: one task per batch, task mixing strategies, rank sharding, length grouping.

Expected values are computed here from the definitions (sizes, batch sizes, ranks), not read
back from the sampler, so a test fails when the behaviour changes, not when the code moves.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from trainer.training.sampling import STRATEGIES, MultitaskBatchSampler, apportion, mixing_weights

SIZES = [10, 7, 23]
BATCH_SIZES = [4, 3, 5]


# ------------------------------------------------------------------------------ helpers
def owner(sizes: list[int], index: int) -> int:
    """The task whose slice of the end-to-end index space holds `index`."""
    start = 0
    for task, n in enumerate(sizes):
        if start <= index < start + n:
            return task
        start += n
    raise AssertionError(f"index {index} outside every task (total {sum(sizes)})")


def batch_task(sizes: list[int], batch: list[int]) -> int:
    tasks = {owner(sizes, i) for i in batch}
    assert len(tasks) == 1, f"batch {batch} mixes tasks {sorted(tasks)}"
    return tasks.pop()


def epoch(sampler: MultitaskBatchSampler, number: int = 0) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


def task_sequence(sizes: list[int], batches: list[list[int]]) -> list[int]:
    return [batch_task(sizes, b) for b in batches]


def batches_per_pass(n: int, batch_size: int, replicas: int = 1) -> int:
    """A pass over n examples split over `replicas` ranks, DistributedSampler-style, without drop_last."""
    return math.ceil(math.ceil(n / replicas) / batch_size)


def replica_samplers(replicas: int, **kwargs) -> list[MultitaskBatchSampler]:
    return [MultitaskBatchSampler(SIZES, BATCH_SIZES, num_replicas=replicas, rank=r, **kwargs) for r in range(replicas)]


def padding_tokens(batches: list[list[int]], lengths: np.ndarray) -> int:
    return int(sum(lengths[b].max() * len(b) - lengths[b].sum() for b in map(np.asarray, batches)))


def mean_spread(batches: list[list[int]], lengths: np.ndarray) -> float:
    return float(np.mean([np.ptp(lengths[np.asarray(b)]) for b in batches]))


# ------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_batch_holds_one_task_and_len_counts_the_batches(strategy, drop_last):
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy=strategy, weights=[1, 2, 3], seed=5, drop_last=drop_last)
    batches = epoch(sampler)

    assert len(batches) == len(sampler)
    for b in batches:
        assert b, "empty batch"
        assert all(0 <= i < sum(SIZES) for i in b)
        batch_task(SIZES, b)


def test_batches_have_their_task_batch_size_and_only_the_pass_end_is_short():
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, seed=1)
    batches = epoch(sampler)
    for task, (n, bs) in enumerate(zip(SIZES, BATCH_SIZES)):
        sizes = [len(b) for b in batches if batch_task(SIZES, b) == task]
        # Without length grouping a pass is cut in order: full batches, then the remainder.
        assert sizes == [bs] * (n // bs) + ([n % bs] if n % bs else [])


def test_drop_last_keeps_only_full_batches():
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, seed=1, drop_last=True)
    batches = epoch(sampler)
    for task, (n, bs) in enumerate(zip(SIZES, BATCH_SIZES)):
        sizes = [len(b) for b in batches if batch_task(SIZES, b) == task]
        assert sizes == [bs] * (n // bs)
    assert len(sampler) == sum(n // bs for n, bs in zip(SIZES, BATCH_SIZES))


@pytest.mark.parametrize("strategy", ["uniform", "temperature", "round_robin"])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_drop_last_never_yields_a_short_batch(strategy, group_by_length):
    # Several passes over the small tasks, and (grouped) shuffled batches: the remainder of a
    # pass must be dropped, not served later.
    lengths = [np.arange(n) % 17 for n in SIZES]
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy=strategy, seed=1, drop_last=True,
                                    lengths=lengths, group_by_length=group_by_length)
    for number in range(3):
        for b in epoch(sampler, number):
            assert len(b) == BATCH_SIZES[batch_task(SIZES, b)]


def test_drop_last_keeps_one_short_batch_for_a_task_smaller_than_its_batch():
    # Dropping it would leave the task with no batch at all.
    sampler = MultitaskBatchSampler([3, 8], [5, 4], drop_last=True)
    batches = epoch(sampler)
    assert sorted(len(b) for b in batches if batch_task([3, 8], b) == 0) == [3]
    assert len(batches) == len(sampler) == 3


def test_proportional_epoch_visits_every_example_of_every_task_exactly_once():
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy="proportional", seed=3)
    batches = epoch(sampler)

    assert sorted(i for b in batches for i in b) == list(range(sum(SIZES)))
    assert len(sampler) == sum(batches_per_pass(n, bs) for n, bs in zip(SIZES, BATCH_SIZES))
    # The tasks are interleaved, not run one after the other.
    assert task_sequence(SIZES, batches) != sorted(task_sequence(SIZES, batches))


# ------------------------------------------------------------------------------ mixing
def test_apportion_splits_the_total_by_largest_remainder():
    assert apportion(10, np.array([0.5, 0.3, 0.2])) == [5, 3, 2]
    assert apportion(10, np.array([0.34, 0.33, 0.33])) == [4, 3, 3]
    assert apportion(7, np.array([1 / 3] * 3)) == [3, 2, 2]  # ties go to the earlier task
    assert apportion(4, np.array([0.55, 0.45])) == [2, 2]
    for total in (1, 13, 100):
        p = np.array([0.61, 0.27, 0.12])
        counts = apportion(total, p)
        assert sum(counts) == total
        assert all(math.floor(q * total) <= c <= math.ceil(q * total) for q, c in zip(p, counts))


def test_proportional_weights_are_the_task_sizes():
    np.testing.assert_allclose(mixing_weights([10, 30, 60], "proportional"), [0.1, 0.3, 0.6])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.7])
def test_temperature_weights_are_size_to_the_one_over_t_normalised(temperature):
    sizes = np.array([5, 100, 2000])
    expected = sizes ** (1 / temperature) / np.sum(sizes ** (1 / temperature))
    np.testing.assert_allclose(mixing_weights(sizes.tolist(), "temperature", temperature=temperature), expected)


def test_temperature_caps_sizes_before_weighting():
    got = mixing_weights([5, 100, 2000], "temperature", temperature=2.0, cap=400)
    capped = np.array([5, 100, 400]) ** 0.5
    np.testing.assert_allclose(got, capped / capped.sum())


def test_temperature_one_is_proportional_and_a_large_one_approaches_uniform():
    sizes = [5, 100, 2000]
    np.testing.assert_allclose(mixing_weights(sizes, "temperature", temperature=1.0), mixing_weights(sizes, "proportional"))
    spread = [np.ptp(mixing_weights(sizes, "temperature", temperature=t)) for t in (1, 2, 10, 100, 1e6)]
    assert spread == sorted(spread, reverse=True)
    np.testing.assert_allclose(mixing_weights(sizes, "temperature", temperature=1e6), [1 / 3] * 3, atol=1e-5)


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-300, 5e-324])
def test_a_tiny_temperature_gives_the_largest_task_everything_without_overflow(temperature):
    # size ** (1/T) overflows to inf (then inf/inf = nan) or underflows to 0 for such T.
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = mixing_weights([10, 7, 23], "temperature", temperature=temperature)
        tied = mixing_weights([10, 23, 23], "temperature", temperature=temperature)
    np.testing.assert_allclose(p, [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(tied, [0, 0.5, 0.5], atol=1e-12)


def test_temperature_weights_stay_exact_for_huge_task_sizes():
    sizes = np.array([1e6, 4e6])
    # (4e6) ** 100 overflows; the ratio (1/4) ** 100 does not.
    np.testing.assert_allclose(mixing_weights(sizes.tolist(), "temperature", temperature=0.01), [0.25**100, 1.0], rtol=1e-9)
    np.testing.assert_allclose(mixing_weights(sizes.tolist(), "temperature", temperature=2.0), [1 / 3, 2 / 3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "temperature", "temperature": 1e-300},
         r"^SAMPLING_TEMPERATURE=1e-300 is not valid: task 'a' \(10 examples\) would get no step of an epoch \(0 of 11; probability"),
        ({"strategy": "temperature", "temperature": 0.05},
         r"^SAMPLING_TEMPERATURE=0.05 is not valid: task 'a' \(10 examples\) would get no step"),
        ({"strategy": "weights", "weights": [1e-9, 1.0, 1.0]},
         r"^TASK_WEIGHTS is not valid: task 'a' \(weight 1e-09\) would get no step of an epoch \(0 of 11; probability"),
    ],
)
def test_a_task_left_without_steps_is_a_setting_error_naming_it(kwargs, message):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        MultitaskBatchSampler(SIZES, BATCH_SIZES, names=["a", "b", "c"], **kwargs)
    assert "\n" not in str(err.value)
    # Without names the task is named by its place.
    with pytest.raises(ConfigError, match="task #0"):
        MultitaskBatchSampler(SIZES, BATCH_SIZES, **kwargs)


def test_weights_strategy_normalises_the_given_weights():
    np.testing.assert_allclose(mixing_weights([1, 1, 1], "weights", weights=[1, 1, 2]), [0.25, 0.25, 0.5])


@pytest.mark.parametrize(
    ("strategy", "kwargs", "expected_p"),
    [
        ("uniform", {}, [1 / 3] * 3),
        ("weights", {"weights": [1.0, 3.0, 6.0]}, [0.1, 0.3, 0.6]),
        ("temperature", {"temperature": 2.0}, np.sqrt(SIZES) / np.sqrt(SIZES).sum()),
    ],
)
def test_task_step_counts_are_the_apportioned_epoch(strategy, kwargs, expected_p):
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy=strategy, seed=2, **kwargs)
    steps = sum(batches_per_pass(n, bs) for n, bs in zip(SIZES, BATCH_SIZES))  # one epoch = one pass over all data
    counts = Counter(task_sequence(SIZES, epoch(sampler)))

    assert len(sampler) == steps
    assert [counts[t] for t in range(3)] == apportion(steps, np.asarray(expected_p))


def test_uniform_revisits_a_small_task_with_a_fresh_pass():
    # Uniform gives the 5-example task far more steps than one pass over it takes.
    sizes, batch_sizes = [5, 200], [5, 5]
    batches = epoch(MultitaskBatchSampler(sizes, batch_sizes, strategy="uniform", seed=4))
    small = [b for b in batches if batch_task(sizes, b) == 0]
    assert len(small) == 21  # 41 steps: 21 + 20
    for b in small:
        assert sorted(b) == list(range(5))  # every pass covers the whole task
    assert len({tuple(b) for b in small}) > 1  # each pass is reshuffled


def test_round_robin_cycles_the_tasks_in_order():
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy="round_robin", seed=9)
    tasks = task_sequence(SIZES, epoch(sampler))
    full_cycles = len(tasks) // 3

    assert tasks[: 3 * full_cycles] == [0, 1, 2] * full_cycles
    tail = tasks[3 * full_cycles :]
    assert tail == sorted(set(tail))  # the leftover steps still go in task order
    # The order does not depend on the seed or the epoch (only the examples do).
    other = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy="round_robin", seed=10)
    assert task_sequence(SIZES, epoch(other, 3)) == tasks


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform"])
def test_batches_depend_only_on_seed_and_epoch(strategy):
    def make(seed):
        return MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy=strategy, seed=seed)

    first = epoch(make(7), 0)
    assert epoch(make(7), 0) == first
    assert list(make(7)) == first  # epoch 0 without set_epoch
    assert epoch(make(7), 1) != first
    assert epoch(make(8), 0) != first
    if strategy == "proportional":  # another order of the same examples
        assert sorted(i for b in epoch(make(7), 1) for i in b) == sorted(i for b in first for i in b)


def test_set_epoch_selects_the_epoch_and_iterating_again_repeats_it():
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy="temperature", seed=7)
    zero = epoch(sampler, 0)
    sampler.set_epoch(2)
    two = list(sampler)
    assert list(sampler) == two
    assert two == epoch(MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy="temperature", seed=7), 2)
    assert two != zero
    assert epoch(sampler, 0) == zero


# ------------------------------------------------------------------------------ length grouping
def test_group_by_length_batches_similar_lengths_and_pads_less():
    rng = np.random.default_rng(0)
    sizes, batch_sizes = [300, 200], [8, 8]
    lengths = [rng.integers(4, 200, size=n) for n in sizes]
    flat = np.concatenate(lengths)

    def run(group):
        sampler = MultitaskBatchSampler(sizes, batch_sizes, seed=1, lengths=lengths, group_by_length=group)
        return epoch(sampler)

    grouped, plain = run(True), run(False)
    assert sorted(i for b in grouped for i in b) == list(range(sum(sizes)))  # still one pass over everything
    for b in grouped:
        batch_task(sizes, b)
    assert mean_spread(grouped, flat) < 0.2 * mean_spread(plain, flat)
    assert padding_tokens(grouped, flat) < 0.2 * padding_tokens(plain, flat)
    # Batches are shuffled after grouping, not served longest first.
    longest = [flat[np.asarray(b)].max() for b in grouped if batch_task(sizes, b) == 0]
    assert longest != sorted(longest, reverse=True)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "shuffle"}, "unknown sampling strategy 'shuffle'"),
        ({"strategy": "weights"}, "one weight per task"),
        ({"strategy": "weights", "weights": [1.0, 2.0]}, "one weight per task"),
        ({"sizes": [10, 0, 23]}, "at least one example"),
        ({"rank": 2, "num_replicas": 2}, "rank 2"),
        ({"rank": -1, "num_replicas": 2}, "rank -1"),
        ({"batch_sizes": [4, 3]}, "one batch size per task"),
        ({"sizes": [], "batch_sizes": []}, "at least one task"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    settings = {"sizes": SIZES, "batch_sizes": BATCH_SIZES, **kwargs}
    with pytest.raises(ValueError, match=message):
        MultitaskBatchSampler(settings.pop("sizes"), settings.pop("batch_sizes"), **settings)


def test_mixing_weights_rejects_an_unknown_strategy():
    with pytest.raises(ValueError, match="use one of proportional"):
        mixing_weights([1, 2], "shuffled")


# ------------------------------------------------------------------------------ several ranks
def check_passes_are_sharded(per_rank: list[list[list[int]]], replicas: int, batch_sizes=BATCH_SIZES) -> None:
    """Within each pass over a task the ranks' examples are disjoint, except the wrap-around
    padding: a complete pass covers every example, and exactly ceil(n/R)*R - n of them twice."""
    tasks = task_sequence(SIZES, per_rank[0])
    for task, (n, bs) in enumerate(zip(SIZES, batch_sizes)):
        steps = [s for s, t in enumerate(tasks) if t == task]
        per_pass = batches_per_pass(n, bs, replicas)
        pad = math.ceil(n / replicas) * replicas - n
        for start in range(0, len(steps), per_pass):
            seen = Counter(i for s in steps[start : start + per_pass] for batches in per_rank for i in batches[s])
            twice = [i for i, c in seen.items() if c == 2]
            assert max(seen.values()) <= 2 and len(twice) <= pad, f"task {task}: ranks overlap beyond padding"
            if start + per_pass <= len(steps):  # a complete pass
                offset = sum(SIZES[:task])
                assert sorted(seen) == list(range(offset, offset + n))
                assert len(twice) == pad


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "proportional"},
        {"strategy": "uniform"},
        {"strategy": "temperature", "temperature": 3.0},
        {"strategy": "round_robin"},
        {"strategy": "proportional", "group_by_length": True},
    ],
    ids=["proportional", "uniform", "temperature", "round_robin", "grouped"],
)
def test_ranks_train_the_same_task_on_disjoint_shards(replicas, kwargs):
    lengths = [np.random.default_rng(n).integers(3, 60, size=n) for n in SIZES]
    samplers = replica_samplers(replicas, seed=11, lengths=lengths, **kwargs)
    for number in (0, 1):
        per_rank = [epoch(s, number) for s in samplers]

        assert len({len(s) for s in samplers}) == 1
        assert all(len(batches) == len(samplers[0]) for batches in per_rank)
        for step in zip(*per_rank):
            assert len({batch_task(SIZES, b) for b in step}) == 1, "ranks train different tasks at one step"
            assert len({len(b) for b in step}) == 1, "ranks have different batch sizes at one step"
        check_passes_are_sharded(per_rank, replicas)


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_split_each_task_evenly_with_drop_last(replicas):
    samplers = replica_samplers(replicas, seed=11, drop_last=True)
    per_rank = [epoch(s) for s in samplers]
    assert len({len(s) for s in samplers}) == 1
    for step in zip(*per_rank):
        assert len({batch_task(SIZES, b) for b in step}) == 1
        task = batch_task(SIZES, step[0])
        assert all(len(b) == BATCH_SIZES[task] for b in step)
    everything = Counter(i for batches in per_rank for b in batches for i in b)
    for task, n in enumerate(SIZES):
        pad = math.ceil(n / replicas) * replicas - n
        twice = [i for i, c in everything.items() if owner(SIZES, i) == task and c > 1]
        assert all(everything[i] == 2 for i in twice) and len(twice) <= pad


def test_one_replica_matches_the_default():
    assert epoch(MultitaskBatchSampler(SIZES, BATCH_SIZES, seed=4, num_replicas=1, rank=0)) == epoch(
        MultitaskBatchSampler(SIZES, BATCH_SIZES, seed=4)
    )


# ------------------------------------------------------------------------------ describing the plan
@pytest.mark.parametrize(("strategy", "settings", "knobs"), [
    ("proportional", {}, {}),
    ("temperature", {"temperature": 3.0, "cap": 12}, {"temperature": 3.0, "cap": 12}),
    ("temperature", {"temperature": 2.0}, {"temperature": 2.0, "cap": None}),
    ("uniform", {"cap": 12}, {}),  # a cap changes nothing here: every task weighs the same
    ("round_robin", {}, {}),
    ("weights", {"weights": [1.0, 3.0, 0.5]}, {"weights": [1.0, 3.0, 0.5]}),
], ids=["proportional", "temperature-cap", "temperature", "uniform", "round_robin", "weights"])
@pytest.mark.parametrize("replicas", [1, 2])
def test_describe_gives_the_plan_the_sampler_yields(strategy, settings, knobs, replicas):
    sampler = MultitaskBatchSampler(SIZES, BATCH_SIZES, strategy=strategy, seed=4, num_replicas=replicas, rank=0, **settings)
    plan = sampler.describe()

    drawn = Counter(task_sequence(SIZES, epoch(sampler, 1)))
    assert plan["strategy"] == strategy and plan["settings"] == knobs
    assert plan["steps"] == sum(drawn.values()) == len(sampler)
    for task, row in enumerate(plan["tasks"]):
        passes = batches_per_pass(SIZES[task], BATCH_SIZES[task], replicas)
        assert row == {"examples": SIZES[task], "batch_size": BATCH_SIZES[task], "batches_per_pass": passes,
                       "steps": drawn[task], "share": pytest.approx(drawn[task] / plan["steps"]),
                       "passes": pytest.approx(drawn[task] / passes)}, (task, row)
    if strategy == "proportional":
        assert all(row["passes"] == 1 for row in plan["tasks"])
