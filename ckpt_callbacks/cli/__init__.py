"""cli: facade (see README.md here)."""

from ckpt_callbacks.cli._main import main as main
