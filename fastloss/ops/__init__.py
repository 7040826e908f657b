"""One module per fused op: Triton kernels, host fwd/bwd, torch.library registration."""
