"""The job layer: every command's I/O around the pure numerics - config -> mesh -> model ->
data -> the trainer loop -> checkpoints and exports; rollout-DPO, eval and generate runs; the
memory planner. Nothing below this layer imports it."""
