"""Fast paths below the model: fused CPU kernels (csrc/), blocked and splash attention, host memory."""
