"""interop: facade (see README.md here). Importing it registers the orbax and safetensors sources."""

from ckpt_callbacks.interop import _orbax_source as _orbax_source  # registers "orbax" with restoring
from ckpt_callbacks.interop import _safetensors_source as _safetensors_source  # registers "safetensors" after orbax
from ckpt_callbacks.interop._orbax_reader import METADATA as METADATA
from ckpt_callbacks.interop._orbax_reader import find_items as find_items
from ckpt_callbacks.interop._orbax_reader import open_item as open_item
from ckpt_callbacks.interop._orbax_reader import pick_item as pick_item
from ckpt_callbacks.interop._orbax_reader import read_item as read_item
from ckpt_callbacks.interop._orbax_reader import step_of_name as step_of_name
from ckpt_callbacks.interop._orbax_reader import unfinished_step as unfinished_step
from ckpt_callbacks.interop._orbax_source import OrbaxSource as OrbaxSource
from ckpt_callbacks.interop._orbax_source import skipped_message as skipped_message
from ckpt_callbacks.interop._orbax_source import skipped_steps as skipped_steps
from ckpt_callbacks.interop._safetensors_export import export_safetensors as export_safetensors
from ckpt_callbacks.interop._safetensors_hook import ExportHook as ExportHook
from ckpt_callbacks.interop._safetensors_source import READ_STATS as READ_STATS
from ckpt_callbacks.interop._safetensors_source import SafetensorsSet as SafetensorsSet
from ckpt_callbacks.interop._safetensors_source import SafetensorsSource as SafetensorsSource
from ckpt_callbacks.interop._safetensors_source import open_safetensors as open_safetensors
