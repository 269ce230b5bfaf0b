"""Checkpoints, a leaf of the package: the object-store interface with its local-folder and GCS
back ends (`storage`), the commit protocol that makes a checkpoint folder complete or absent
(`commits`), one writer per run (`lease`), and the `Trainer` callback that commits every
checkpoint, resumes and handles preemption (`callback`). Only `config` is imported from the rest
of the package; the commands wire it to training."""
