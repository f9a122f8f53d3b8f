"""XLA_FLAGS for the test suite's processes: this one (conftest.py) and the commands the tests start.

The suite compiles far more than it runs, so every process skips LLVM's optimisation of the generated kernels
(the slowest part of an XLA:CPU compile). The HLO program and its fusions are the ones users run; only the
kernels' machine code is less optimised (it may differ from the default in the last bit where a multiply and
an add are contracted into one instruction, inside every tolerance here but one: see USER_OPTIMISATION).
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"
# XLA's default level, for the one compile a test must make as users do (per compile, over FAST_COMPILE):
# the float32 gradient parity test, whose bound on float32 summation noise -O0 exceeds on some CPUs.
USER_OPTIMISATION = {"xla_backend_optimization_level": 3}


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a CPU process that simulates `devices` devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
