"""A fixed CPU workload, to compare CPU timings across machines: 200 steps of c = tanh(c @ b) with float32
(1024, 1024) matrices, compiled by JAX on the CPU. Prints the median seconds of 3 runs. The CPU times in the
README and in docs/ each give this script's time on the machine they ran on: a time there scales to your
machine as time x (your seconds / its seconds).  Run: python docs/cpu_reference.py"""
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import jax.numpy as jnp
import numpy as np

a, b = (jax.random.normal(jax.random.key(i), (1024, 1024)) for i in (0, 1))
work = jax.jit(lambda a, b: jax.lax.fori_loop(0, 200, lambda i, c: jnp.tanh(c @ b), a))
work(a, b).block_until_ready()  # compiled before the clock starts
seconds = []
for _ in range(3):
    t0 = time.perf_counter()
    work(a, b).block_until_ready()
    seconds.append(time.perf_counter() - t0)
print(f"{np.median(seconds):.3f}")
