"""Benchmarks of the multitask trainer against the plain Hugging Face `Trainer` and the seed recipe.

Each benchmark runs its own baseline in the same process and reports ratios of measured
numbers: `python -m benchmarks` (quick) or `python -m benchmarks --full`. Results land in
`benchmarks/results/` as one JSON file and one PNG per benchmark plus `SUMMARY.md`.

The benchmarks import the trainer; the trainer never imports them.
"""
