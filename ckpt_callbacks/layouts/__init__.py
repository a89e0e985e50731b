"""layouts: facade (see README.md here). Importing it registers the zarr3 and process layouts."""

from ckpt_callbacks.layouts import _zarr3 as _zarr3  # registers "zarr3" (first: the default)

# isort: split
from ckpt_callbacks.layouts import _process_files as _process_files  # registers "process"
from ckpt_callbacks.layouts._base import Layout as Layout
from ckpt_callbacks.layouts._base import LayoutReader as LayoutReader
from ckpt_callbacks.layouts._base import LayoutWriter as LayoutWriter
from ckpt_callbacks.layouts._base import kinds as kinds
from ckpt_callbacks.layouts._base import layout_for as layout_for
from ckpt_callbacks.layouts._base import locate as locate
from ckpt_callbacks.layouts._base import of_manifest as of_manifest
from ckpt_callbacks.layouts._base import register_layout as register_layout
from ckpt_callbacks.layouts._direct import DirectRead as DirectRead
from ckpt_callbacks.layouts._direct import applies as applies
from ckpt_callbacks.layouts._examples import EXAMPLES as EXAMPLES
from ckpt_callbacks.layouts._examples import fsdp_spec as fsdp_spec
from ckpt_callbacks.layouts._examples import llama70b as llama70b
from ckpt_callbacks.layouts._plan import MAX_DEVICES as MAX_DEVICES
from ckpt_callbacks.layouts._plan import MAX_LEAVES as MAX_LEAVES
from ckpt_callbacks.layouts._plan import MAX_PLAN_WORK as MAX_PLAN_WORK
from ckpt_callbacks.layouts._plan import LayoutCounts as LayoutCounts
from ckpt_callbacks.layouts._plan import LeafShape as LeafShape
from ckpt_callbacks.layouts._plan import _owners as _owners
from ckpt_callbacks.layouts._plan import _units as _units
from ckpt_callbacks.layouts._plan import plan_layout as plan_layout
from ckpt_callbacks.layouts._process_files import FILE_BYTES as FILE_BYTES
from ckpt_callbacks.layouts._process_files import file_bytes as file_bytes
from ckpt_callbacks.layouts._reads import LeafRead as LeafRead
from ckpt_callbacks.layouts._reads import PackFiles as PackFiles
from ckpt_callbacks.layouts._reads import settle as settle
from ckpt_callbacks.layouts._regions import data_sharding as data_sharding
from ckpt_callbacks.layouts._regions import host_memory as host_memory
