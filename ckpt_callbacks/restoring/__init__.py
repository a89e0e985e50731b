"""restoring: facade (see README.md here)."""

from ckpt_callbacks.restoring import _api
from ckpt_callbacks.restoring._api import restore as restore
from ckpt_callbacks.restoring._reads import READ_WINDOW_BYTES as READ_WINDOW_BYTES
from ckpt_callbacks.restoring._reads import finish_leaf as finish_leaf
from ckpt_callbacks.restoring._reads import read_leaves as read_leaves
from ckpt_callbacks.restoring._reads import regions_of as regions_of
from ckpt_callbacks.restoring._rules import match_partition_rules as match_partition_rules
from ckpt_callbacks.restoring._rules import shardings_from_rules as shardings_from_rules
from ckpt_callbacks.restoring._sources import Located as Located
from ckpt_callbacks.restoring._sources import Source as Source
from ckpt_callbacks.restoring._sources import StepSource as StepSource
from ckpt_callbacks.restoring._sources import foreign_steps as foreign_steps
from ckpt_callbacks.restoring._sources import locate as locate
from ckpt_callbacks.restoring._sources import register_source as register_source
from ckpt_callbacks.restoring._sources import sources as sources
from ckpt_callbacks.restoring._sources import unregister_source as unregister_source
from ckpt_callbacks.restoring._targets import Target as Target
from ckpt_callbacks.restoring._verify import VerifyProblem as VerifyProblem
from ckpt_callbacks.restoring._verify import VerifyReport as VerifyReport
from ckpt_callbacks.restoring._verify import verify as verify

# restore's own check of its arguments (before any read), for callers that check before listing
check_arguments = _api._check_arguments
# the leaves under ``keys`` as restore selects them (indices into the records)
select = _api.engine._select
