"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, SD3 and FLUX.1.

`detection` (torch-free) reads a pipeline folder's `model_index.json` and says which family it
is and whether a method is supported on it; `registry` maps each family name to its
`ModelFamily` (`base.py`), which owns prompt encoding, the noise/target/loss, the sampling
pipeline, the LoRA target modules and the artifact savers. Adding a family is one module with a
`ModelFamily` subclass, one row in `detection.FAMILIES` and one entry in `registry.FAMILY_CLASSES`.
"""
