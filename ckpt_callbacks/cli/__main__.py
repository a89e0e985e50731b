"""``python -m ckpt_callbacks.cli``: the ``ckpt-callbacks`` command."""

import sys

from ckpt_callbacks.cli import main

sys.exit(main())
