"""Triton kernels. Inside the library, never a top-level ``kernels``: that is a PyPI package
(Hugging Face's) which transformers imports when it is installed, and a checkout's folder of
that name would shadow it.

Import the kernel modules themselves (``fsdp_sync.kernels.fp8_quant``): importing this
package must not pull in Triton.
"""
