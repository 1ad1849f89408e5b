#!/usr/bin/env bash
# One-command demo: install into .venv (CPU torch from the lock), write a held-out concept's photos,
# and personalize the embedded tiny model on them with DVAR early stopping. No GPU, no download.
set -euo pipefail
cd "$(dirname "$0")"
# Everything goes into the project's own virtualenv (.venv), exactly as locked.
bash tools/install-venv.sh
.venv/bin/python - <<'PY'
from personalize.world.shapes import concept_by_name, write_concept_images
paths = write_concept_images(concept_by_name("red_striped_triangle"), 8, "demo-output/concept-images", seed=0)
print(f"wrote {len(paths)} concept images to demo-output/concept-images")
PY
.venv/bin/personalize-train --config demo/job.yaml --output demo-output
# How far training moved the samples towards the concept: tiny-CLIP image similarity (CLIP-I) of
# the before/after grids (same prompts, same noise) to the concept's photos.
TRANSFORMERS_VERBOSITY=error .venv/bin/python - <<'PY'
from pathlib import Path
from PIL import Image
import transformers
transformers.utils.logging.disable_progress_bar()
from personalize.samples import grid_tiles
from personalize.world.scoring import clip_i_score, load_tiny_clip
clip, _ = load_tiny_clip()
photos = [Image.open(p).convert("RGB") for p in sorted(Path("demo-output/concept-images").iterdir())]
before, after = (grid_tiles(Image.open(f"demo-output/{name}").convert("RGB"), 32) for name in ("samples_before.png", "samples.png"))
print(f"CLIP-I to the concept photos: before {clip_i_score(clip, before, photos):.3f}, after {clip_i_score(clip, after, photos):.3f}"
      " (compare demo-output/samples_before.png with demo-output/samples.png)")
PY
