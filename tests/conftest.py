"""Test-wide set-up: 8 simulated CPU devices (before jax is imported) so sharding tests run anywhere."""

import os

# The scheduler flag avoids an XLA:CPU collective deadlock seen on 2-core machines with a (1,2,4) mesh.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
