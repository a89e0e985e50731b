"""Is jax.device_put(numpy, cpu_device) done before it returns? (single process, CPU)

Reuse of a host staging buffer right after device_put is only safe if the copy is synchronous.
Run: JAX_PLATFORMS=cpu python device_put_alias_probe.py
"""

import jax
import numpy as np

for n in (64, 1 << 20, 8 << 20):
    a = np.zeros(n, np.uint8)
    x = jax.device_put(a, jax.devices()[0])
    x.block_until_ready()
    a[:] = 7
    print(f"{n} bytes, mutate after block_until_ready:", "aliased" if int(np.asarray(x)[0]) == 7 else "copied")
bad = 0
for _ in range(50):
    a = np.zeros(8 << 20, np.uint8)
    x = jax.device_put(a, jax.devices()[0])
    a[:] = 7  # no wait: is the copy already done?
    bad += int(np.asarray(x)[-1]) == 7
print(f"8 MiB, mutate right after device_put (no wait): mutation visible in the device array {bad} of 50 times")
