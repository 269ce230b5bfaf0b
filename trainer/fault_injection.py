"""Test-only fault injection: where the crash and preemption tests interrupt a real run.

Nothing here does anything unless one of these environment variables is set (the tests set
them on the `python -m trainer train` processes they start; users never need them):

- ``TRAINER_CRASH_AT=<point>[:<step>]`` kills the process with SIGKILL when it reaches the
  named point (at that step, when one is given), as a lost VM or an OOM kill would.
  Points: ``mid_step`` (after backward, before the optimizer step), ``before_upload``
  (checkpoint saved locally, commit not started), ``mid_upload`` (some files uploaded),
  ``before_manifest`` (every file uploaded, no manifest), ``after_manifest`` (committed,
  not yet pruned), ``mid_export`` (the first task exported, the others not),
  ``mid_final_upload`` (some files of the final model uploaded), ``before_final_manifest``.
- ``TRAINER_SIGTERM_AT=<step>[:<seconds>]`` sends this process a real SIGTERM when that
  training step ends (as a Spot VM's preemption notice would), and a second one
  ``<seconds>`` later when given.
- ``TRAINER_SLOW_UPLOADS=<seconds>`` makes every object upload take that much longer (a slow
  bucket), so that a signal reliably arrives while a commit is in flight.

Kept in one module, apart from the production classes, which never call it: `train` puts the
store proxy (the commit crash points) around the store it commits to, and adds the callback (the
training-loop points), only when `active()`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_VARS = ("TRAINER_CRASH_AT", "TRAINER_SIGTERM_AT", "TRAINER_SLOW_UPLOADS")


def active() -> bool:
    return any(os.environ.get(name) for name in _VARS)


def crash_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if TRAINER_CRASH_AT names this point (and step)."""
    wanted = os.environ.get("TRAINER_CRASH_AT")
    if not wanted:
        return
    point, _, at = wanted.partition(":")
    if point == name and (not at or step is None or int(at) == step):
        logger.warning("TRAINER_CRASH_AT=%s: killing the process", wanted)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def wraps_store(store: Any, step: int | None = None, *, final: bool = False) -> Any:
    """The store to commit through: a faulty proxy when faults are active, else `store` itself.
    Checkpoint commits take their step from the object names (``<run>/checkpoint-<step>/…``); the
    final model's commit (``final``) is told its step."""
    return FaultyStore(store, step, final=final) if active() else store


_CHECKPOINT_KEY = re.compile(r"/checkpoint-(\d+)/")


class FaultyStore:
    """Store proxy reaching the commit crash points (mid_upload, before_manifest, after_manifest and
    their final-model counterparts) and slowing uploads on request."""

    def __init__(self, store: Any, step: int | None = None, *, final: bool = False):
        self._store, self._step, self._final = store, step, final
        self._uploads: dict[int | None, int] = {}
        self._lock = threading.Lock()  # commits upload in parallel
        self._delay = float(os.environ.get("TRAINER_SLOW_UPLOADS") or 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _step_of(self, key: str) -> int | None:
        if self._final:
            return self._step
        found = _CHECKPOINT_KEY.search("/" + key)
        return int(found[1]) if found else None

    def upload_file(self, path, key: str, *args, **kwargs):
        time.sleep(self._delay)
        info = self._store.upload_file(path, key, *args, **kwargs)
        step = self._step_of(key)
        with self._lock:
            self._uploads[step] = uploads = self._uploads.get(step, 0) + 1
        if uploads == 2:
            crash_point("mid_final_upload" if self._final else "mid_upload", step)
        return info

    def write_bytes(self, key: str, *args, **kwargs):
        manifest = key.endswith("/MANIFEST.json")
        if manifest:
            crash_point("before_final_manifest" if self._final else "before_manifest", self._step_of(key))
        info = self._store.write_bytes(key, *args, **kwargs)
        if manifest and not self._final:
            crash_point("after_manifest", self._step_of(key))
        return info


class FaultCallback(TrainerCallback):
    """Reaches the training-loop fault points: mid_step crashes and SIGTERM at a step."""

    def __init__(self, wait_for_commits=lambda: None):
        self.wait_for_commits = wait_for_commits  # so a crash test knows what was committed
        spec = os.environ.get("TRAINER_SIGTERM_AT", "")
        step, _, again = spec.partition(":")
        self.sigterm_step = int(step) if step else None
        self.second_after = float(again) if again else None

    def on_save(self, args, state, control, **kwargs):
        # The Trainer has written the checkpoint in its folder; the commit (a later callback) has not started.
        if state.is_world_process_zero:  # the process that commits
            crash_point("before_upload", state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if os.environ.get("TRAINER_CRASH_AT", "").startswith("mid_step"):
            self.wait_for_commits()
            crash_point("mid_step", state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.sigterm_step is not None and state.global_step == self.sigterm_step and state.is_local_process_zero:
            logger.warning("TRAINER_SIGTERM_AT: sending SIGTERM at step %d (t=%.3f)", state.global_step, time.time())
            os.kill(os.getpid(), signal.SIGTERM)
            if self.second_after is not None:
                def again():
                    logger.warning("TRAINER_SIGTERM_AT: sending a second SIGTERM (t=%.3f)", time.time())
                    os.kill(os.getpid(), signal.SIGTERM)

                timer = threading.Timer(self.second_after, again)
                timer.daemon = True  # a job that ends sooner gets no second signal
                timer.start()


def callbacks(wait_for_commits=lambda: None) -> list[TrainerCallback]:
    return [FaultCallback(wait_for_commits)] if active() else []
