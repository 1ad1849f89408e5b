"""The shipped CLIP BPE tokenizer (converted from open_clip's vocabulary)."""

import pytest
from transformers import CLIPTokenizer

from personalize.world.tiny_models import TOKENIZER_DIR

# The reference: ids that open_clip 3.3.0's SimpleTokenizer (open_clip/tokenizer.py over its
# bpe_simple_vocab_16e6.txt.gz) gave for these strings when tinyworld/convert_tokenizer.py built
# the shipped files. open_clip stays out of the lock (it pulls in torchvision), so the ids are pinned.
KNOWN_IDS = {
    "a red striped triangle on a grass background": [49406, 320, 736, 22192, 14615, 525, 320, 5922, 5994, 49407],
    "sks dog photo of a  TOK": [49406, 48136, 1929, 1125, 539, 320, 27010, 49407],
}


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

