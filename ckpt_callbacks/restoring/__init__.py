"""restoring: facade (see README.md here)."""

from ckpt_callbacks.restoring._engine import read_leaves as read_leaves
from ckpt_callbacks.restoring._engine import restore as restore
from ckpt_callbacks.restoring._rules import match_partition_rules as match_partition_rules
from ckpt_callbacks.restoring._rules import shardings_from_rules as shardings_from_rules
from ckpt_callbacks.restoring._targets import Target as Target
from ckpt_callbacks.restoring._targets import data_sharding as data_sharding
