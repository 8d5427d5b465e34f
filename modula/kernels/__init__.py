"""The expert mixture of an adapted layer: a readable reference loop (the test oracle), the stacked two-GEMM form (CPU default) and fused Triton kernels (GPU). Knows nothing of Ray or HF."""
