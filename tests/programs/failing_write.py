"""A save whose files may not grow past 1 MiB (RLIMIT_FSIZE: a real EFBIG from the kernel).

    python failing_write.py PATH OVERWRITE(0|1)

Prints ``SAVED``, or ``FAILED <type> errno=<errno> <message>``.
"""

import os
import resource
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import numpy as np

import ckpt_callbacks as cc


def main(path: str, overwrite: bool) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files over 1 MiB fail: EFBIG
    handle = cc.save_async(path, {"big": np.ones(1 << 20, np.float32)}, step=2, overwrite=overwrite)
    try:
        handle.wait()
    except Exception as e:
        print("FAILED", type(e).__name__, f"errno={getattr(e, 'errno', None)}", e)
    else:
        print("SAVED")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
