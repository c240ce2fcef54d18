"""Each family's on-the-fly apply as torch ops over grouped tokens, and as Triton kernels over segmented tokens.

The modules at this level (lowrank, lorta, miss, bat, bottleneck) are the padded ops: every op works on one bucket
of the batch (adapters of one family and shape, see `tenfold.engine.batch_plan`): the bucket's tokens are laid out as
C chunks of G rows, each chunk using one adapter, and every factor table arrives already indexed per chunk (leading
axis C). Padding rows repeat a real token and are dropped by the caller, so no op needs masks. Ops compute in the
dtype of the tables they get (fp32 on CPU, where bf16 matmuls are slow).

The device path: `segments` groups a step's tokens by table row on the device (no host sync), `triton` holds one
kernel per family apply over flat token rows and whole tables, `reference` the torch ops of the same names and
signatures (the padded ops above, run over the segments' tiles: the reference the kernels are tested against), and
`dispatch` picks the kernel on CUDA and the reference op elsewhere.

`cpu` holds tenfold's C++ CPU kernels (built on first use for the machine's CPU): the low-rank shrink and expand of
every module of a layer straight from a bucket's tables into the layer output, which the engine uses on CPU for lora,
loretta_rep and miss.
"""
