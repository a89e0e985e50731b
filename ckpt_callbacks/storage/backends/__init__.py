"""backends: one module per URL scheme, each ending in its ``register_backend`` call (see
../README.md); imported by ``ckpt_callbacks.storage``. The order here is the order of the
schemes in messages ("expected one of ('file', 'memory', 's3', 'gs')")."""

# isort: off
from ckpt_callbacks.storage.backends._file import FileBackend as FileBackend
from ckpt_callbacks.storage.backends._memory import MemoryBackend as MemoryBackend
from ckpt_callbacks.storage.backends._s3 import S3Backend as S3Backend
from ckpt_callbacks.storage.backends._gs import GCSBackend as GCSBackend

# isort: on
from ckpt_callbacks.storage.backends._base import BaseBackend as BaseBackend
from ckpt_callbacks.storage.backends._base import FsspecBackend as FsspecBackend
from ckpt_callbacks.storage.backends._gs import GCS_BATCH as GCS_BATCH
from ckpt_callbacks.storage.backends._objects import ObjectStore as ObjectStore
from ckpt_callbacks.storage.backends._s3 import S3_BATCH as S3_BATCH
