"""tools/demo_strip.py, the README's before/after picture: every photo and every sample of the
trainer's labelled grids lands in its place (photos on top; per prompt, before on the left and
after on the right), so the picture shows the demo's real images in the order its labels say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

from personalize.samples import image_grid

TOOL = Path(__file__).resolve().parents[1] / "tools" / "demo_strip.py"
spec = importlib.util.spec_from_file_location("demo_strip", TOOL)
demo_strip = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_strip)

SIZE, PER_PROMPT = 32, 3


def solid(value: int) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (value, 255 - value, (value * 7) % 256))


def test_photos_then_before_and_after_of_each_prompt_in_their_places():
    photos = [solid(10 + i) for i in range(5)]
    prompts = ["a photo of <x> triangle", "a photo of <x> triangle on grass"]
    before_rows = [[solid(100 + 10 * r + c) for c in range(PER_PROMPT)] for r in range(len(prompts))]
    after_rows = [[solid(180 + 10 * r + c) for c in range(PER_PROMPT)] for r in range(len(prompts))]
    # The trainer's grids, with the label strips the tool has to skip.
    before = demo_strip.prompt_rows(image_grid(before_rows, prompts), PER_PROMPT)
    after = demo_strip.prompt_rows(image_grid(after_rows, prompts), PER_PROMPT)
    assert [[t.getpixel((5, 5)) for t in row] for row in before] == [[t.getpixel((5, 5)) for t in row] for row in before_rows]

    strip = demo_strip.make_strip(photos, prompts, before, after, "after")

    tile = SIZE * demo_strip.SCALE
    centre = tile // 2
    top = demo_strip.TEXT
    assert [strip.getpixel((i * tile + centre, top + centre)) for i in range(len(photos))] == [p.getpixel((0, 0)) for p in photos]
    top += tile
    right = PER_PROMPT * tile + demo_strip.GAP
    for r in range(len(prompts)):
        top += demo_strip.GAP // 2
        row_top = top + 2 * demo_strip.TEXT
        assert [strip.getpixel((c * tile + centre, row_top + centre)) for c in range(PER_PROMPT)] == \
            [t.getpixel((0, 0)) for t in before_rows[r]]
        assert [strip.getpixel((right + c * tile + centre, row_top + centre)) for c in range(PER_PROMPT)] == \
            [t.getpixel((0, 0)) for t in after_rows[r]]
        top += 2 * demo_strip.TEXT + tile
    assert strip.height == top
