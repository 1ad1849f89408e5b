"""The shipped CLIP BPE tokenizer (converted from open_clip's vocabulary)."""

import importlib.util
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from personalize.world.tiny_models import TOKENIZER_DIR

# Ids produced by open_clip 3.3.0's SimpleTokenizer for these strings (checked when converting).
KNOWN_IDS = {
    "a red striped triangle on a grass background": [49406, 320, 736, 22192, 14615, 525, 320, 5922, 5994, 49407],
    "sks dog photo of a  TOK": [49406, 48136, 1929, 1125, 539, 320, 27010, 49407],
}
SAMPLES = list(KNOWN_IDS) + ["Hello, World! cafe naïve 123 <sks>", "emoji 🙂 and 日本語"]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def test_vocabulary_has_clip_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_ids_match_open_clip(tokenizer, text):
    assert tokenizer(text).input_ids == KNOWN_IDS[text]


@pytest.mark.parametrize("text", ["a red striped triangle on a grass background", "a photo of sks dog"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def _open_clip_simple_tokenizer():
    """open_clip's tokenizer module, loaded alone: the package's __init__ imports torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as error:  # ftfy / regex missing
        pytest.skip(f"open_clip tokenizer not importable: {error}")
    return module.SimpleTokenizer()


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_match_installed_open_clip(tokenizer, text):
    reference = _open_clip_simple_tokenizer()
    expected = [reference.encoder["<start_of_text>"]] + reference.encode(text) + [reference.encoder["<end_of_text>"]]
    assert tokenizer(text).input_ids == expected
