"""The parts of the toy base-model recipe; `dcustom.toyworld.train_base` runs them in order.

- `text`: what the text stage learns: grammar words -> concepts, the caption encoder, the probe and its loss.
- `stages`: `Run`, the state of one run (modules, data pool, optimizer, stage, step) and one step per stage.
- `checkpoints`: a run's checkpoints/step-N folders (written atomically) and resuming from them.
- `curve`: the learning curve (judge accuracy of the UNet on held-out prompts) and its plot.
- `install`: copying a finished model into the package as builtin:toy, never over a better one.

The recipe keeps its own short loop rather than `trainers.loop`: three stages with their own optimizers,
a per-step generator instead of the global RNG, and a checkpoint of whole modules (not trainable
parameters) that running recipes already resume from.
"""
