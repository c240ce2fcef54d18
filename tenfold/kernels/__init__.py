"""Each family's on-the-fly apply as a torch op over grouped tokens (the torch twins; Triton kernels join them).

Every op works on one bucket of the batch (adapters of one family and shape, see `tenfold.engine.batch_plan`): the
bucket's tokens are laid out as C chunks of G rows, each chunk using one adapter, and every factor table arrives
already indexed per chunk (leading axis C). Padding rows repeat a real token and are dropped by the caller, so no op
needs masks. Ops compute in the dtype of the tables they get (fp32 on CPU, where bf16 matmuls are slow).
"""
