"""saving: facade (see README.md here)."""

from ckpt_callbacks.saving._api import save as save
from ckpt_callbacks.saving._api import save_async as save_async
from ckpt_callbacks.saving._api import save_items as save_items
from ckpt_callbacks.saving._api import save_items_async as save_items_async
from ckpt_callbacks.saving._engine import _plan as _plan
from ckpt_callbacks.saving._options import SaveHandle as SaveHandle
from ckpt_callbacks.saving._options import SaveOptions as SaveOptions
from ckpt_callbacks.saving._options import SaveStats as SaveStats
from ckpt_callbacks.saving._snapshot import HOST_BUFFERS as HOST_BUFFERS
from ckpt_callbacks.saving._snapshot import Snapshot as Snapshot
from ckpt_callbacks.saving._snapshot import device_budgets as device_budgets
from ckpt_callbacks.saving._snapshot import unit_bytes as unit_bytes
from ckpt_callbacks.saving._writer import Writer as Writer
