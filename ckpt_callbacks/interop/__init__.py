"""interop: facade (see README.md here)."""

from ckpt_callbacks.interop._orbax_reader import METADATA as METADATA
from ckpt_callbacks.interop._orbax_reader import find_items as find_items
from ckpt_callbacks.interop._orbax_reader import open_item as open_item
from ckpt_callbacks.interop._orbax_reader import read_item as read_item
