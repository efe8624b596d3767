"""How finely the vocab-parallel log-prob pass is chunked: torch-free, so the memory planner
reads the same number the kernel uses."""

# Elements of fp32 scratch per chunk (2-3 buffers): 4 Mi elements = 16 MiB each. Large
# enough for the chunk's matmul and element-wise work to run at full speed, small next to
# the [tokens, V/TP] tensors the common approach holds.
LOGITS_CHUNK_ELEMENTS = 1 << 22
