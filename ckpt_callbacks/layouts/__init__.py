"""layouts: facade (see README.md here)."""

from ckpt_callbacks.layouts._direct import DirectRead as DirectRead
from ckpt_callbacks.layouts._direct import applies as applies
from ckpt_callbacks.layouts._plan import EXAMPLES as EXAMPLES
from ckpt_callbacks.layouts._plan import MAX_DEVICES as MAX_DEVICES
from ckpt_callbacks.layouts._plan import MAX_LEAVES as MAX_LEAVES
from ckpt_callbacks.layouts._plan import MAX_PLAN_WORK as MAX_PLAN_WORK
from ckpt_callbacks.layouts._plan import LayoutCounts as LayoutCounts
from ckpt_callbacks.layouts._plan import LeafShape as LeafShape
from ckpt_callbacks.layouts._plan import _owners as _owners
from ckpt_callbacks.layouts._plan import _units as _units
from ckpt_callbacks.layouts._plan import fsdp_spec as fsdp_spec
from ckpt_callbacks.layouts._plan import llama70b as llama70b
from ckpt_callbacks.layouts._plan import plan_layout as plan_layout
from ckpt_callbacks.layouts._process_files import FILE_BYTES as FILE_BYTES
from ckpt_callbacks.layouts._process_files import LAYOUTS as LAYOUTS
from ckpt_callbacks.layouts._process_files import file_bytes as file_bytes
from ckpt_callbacks.layouts._process_files import item_source as item_source
from ckpt_callbacks.layouts._process_files import manifests as manifests
from ckpt_callbacks.layouts._process_files import read_leaves as read_leaves
from ckpt_callbacks.layouts._process_files import write_indexes as write_indexes
from ckpt_callbacks.layouts._reads import LeafRead as LeafRead
from ckpt_callbacks.layouts._reads import PackFiles as PackFiles
from ckpt_callbacks.layouts._reads import host_memory as host_memory
from ckpt_callbacks.layouts._reads import settle as settle
