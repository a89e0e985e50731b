"""An ``on_commit`` hook exporting the final checkpoint to safetensors (``ExportHook``)."""

from __future__ import annotations

import logging
from typing import Any

from ckpt_callbacks import distributed
from ckpt_callbacks.interop._safetensors_export import export_safetensors

log = logging.getLogger("ckpt_callbacks")


class ExportHook:
    """An ``on_commit`` hook that exports committed checkpoints to safetensors, so a run ends
    with weights ready to serve:

        Checkpointer(base, ..., on_commit=[ExportHook("serve/", at_step=num_steps, dtype=jnp.bfloat16)])

    It runs on process 0 only, in the manager's after-commit thread (the loop is not held),
    after the checkpoint is committed. ``at_step``: export only the checkpoint of that step
    (the final one, saved by ``on_train_end``); None exports every commit, each replacing the
    last (``overwrite``). Other keyword arguments are ``export_safetensors``'s. A failed export
    is logged as a WARNING by the manager, and the checkpoint itself is untouched.
    """

    def __init__(self, out_dir: Any, *, at_step: int | None = None, **options: Any) -> None:
        if at_step is not None and (not isinstance(at_step, int) or isinstance(at_step, bool) or at_step < 0):
            raise ValueError(f"at_step={at_step!r}: expected a step >= 0, or None for every commit")
        self.out_dir, self.at_step, self.options = out_dir, at_step, options
        self.exported: list[tuple[int, list[str]]] = []  # (step, files) of each export done

    def __call__(self, path: str, step: int, metadata: dict[str, Any]) -> None:

        if not distributed.is_primary() or (self.at_step is not None and step != self.at_step):
            return
        options = {"overwrite": True, "progress": False} | self.options
        files = export_safetensors(path, self.out_dir, **options)
        log.info("exported step %d (%s) to %d safetensors file(s) in %s", step, path, len(files), self.out_dir)
        self.exported.append((step, files))
