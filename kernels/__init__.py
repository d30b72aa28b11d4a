"""Triton kernels, installed as ``fsdp_sync.kernels`` (see pyproject.toml for why not ``kernels``).

Import the kernel modules themselves (``fsdp_sync.kernels.fp8_quant``): importing this
package must not pull in Triton.
"""
