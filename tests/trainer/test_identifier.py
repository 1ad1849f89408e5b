"""Unique identifiers: rare tokens for `token: auto`, new tokens for learned embeddings."""

from __future__ import annotations

import pytest
import torch

from personalize.errors import TrainerInputError
from personalize.identifier import decode_rare_tokens, pick_rare_tokens, setup_identifier, token_ids_of
from personalize.world.tiny_models import TinyConfig, build_text_encoder, load_tokenizer


@pytest.fixture
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def text_encoder():
    return build_text_encoder(TinyConfig.test(), seed=0)


def test_rare_tokens_are_the_latest_merges_of_short_plain_words(tokenizer):
    ids = pick_rare_tokens(tokenizer, 3)
    vocab = tokenizer.get_vocab()
    entries = tokenizer.convert_ids_to_tokens(ids)
    assert ids == sorted(ids, reverse=True)
    for entry in entries:
        assert entry.endswith("</w>") and entry[:-4].isalpha() and len(entry) <= 7
    # Nothing with a higher id qualifies: every plain short word above the first pick is skipped
    # only because it does not round-trip.
    above = [t for t, i in vocab.items() if i > ids[0] and t.endswith("</w>") and t[:-4].isalpha() and len(t) <= 7]
    assert all(token_ids_of(tokenizer, t[:-4]) != [vocab[t]] for t in above)


def test_rare_text_tokenizes_back_to_the_same_ids(tokenizer):
    ids = pick_rare_tokens(tokenizer, 2)
    text = decode_rare_tokens(tokenizer, ids)
    assert token_ids_of(tokenizer, text) == ids
    assert len(text) <= 8


def test_excluded_words_and_added_tokens_are_skipped(tokenizer):
    first = tokenizer.convert_ids_to_tokens(pick_rare_tokens(tokenizer, 1))[0][:-4]
    second = pick_rare_tokens(tokenizer, 1, exclude={first})
    assert tokenizer.convert_ids_to_tokens(second)[0][:-4] != first
    tokenizer.add_tokens([first])  # e.g. another concept's token already in this tokenizer
    assert pick_rare_tokens(tokenizer, 1) == second


def test_auto_for_dreambooth_uses_existing_rows(tokenizer, text_encoder):
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    ident = setup_identifier(tokenizer, text_encoder, "auto", learns_embedding=False, num_identifier_tokens=2)
    assert not ident.added and len(ident.token_ids) == 2
    assert token_ids_of(tokenizer, ident.text) == ident.token_ids
    assert text_encoder.get_input_embeddings().weight.shape[0] == rows


def test_auto_for_embedding_methods_adds_a_new_row_initialised_from_the_initializer(tokenizer, text_encoder):
    table = text_encoder.get_input_embeddings().weight
    init_row = table[token_ids_of(tokenizer, "triangle")].mean(0).detach().clone()
    ident = setup_identifier(
        tokenizer, text_encoder, "auto", learns_embedding=True, initializer="triangle", exclude_texts=["a photo"]
    )
    assert ident.added and ident.text.startswith("<") and ident.rare_tokens
    new_table = text_encoder.get_input_embeddings().weight
    assert new_table.shape[0] == len(tokenizer) == 49409
    assert torch.equal(new_table[ident.token_ids[0]], init_row)
    # The new token is one token in a caption, and never matched inside another word.
    ids = token_ids_of(tokenizer, f"a photo of {ident.text} triangle")
    assert ident.token_ids[0] in ids and len(ids) == 5


def test_multi_vector_tokens(tokenizer, text_encoder):
    ident = setup_identifier(tokenizer, text_encoder, "zqtoy", learns_embedding=True, num_vectors=3, initializer="dog")
    assert ident.text == "zqtoy zqtoy_1 zqtoy_2" and ident.token == "zqtoy"
    assert token_ids_of(tokenizer, ident.text) == ident.token_ids


@pytest.mark.parametrize("token", ["dog", "sks"])
def test_a_new_token_for_a_learned_embedding_must_not_be_in_the_vocabulary(tokenizer, text_encoder, token):
    with pytest.raises(TrainerInputError, match=f"concept.token '{token}' already exists .* textualInversion trains a new"):
        setup_identifier(tokenizer, text_encoder, token, learns_embedding=True, initializer="dog",
                         method="textualInversion")


def test_methods_without_learned_embeddings_use_an_existing_token_as_it_is(tokenizer, text_encoder):
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    ident = setup_identifier(tokenizer, text_encoder, "sks", learns_embedding=False, method="dreambooth",
                             exclude_texts=["a photo of {token} {class_noun}", "triangle"])
    assert not ident.added and ident.text == ident.token == "sks"
    assert ident.token_ids == [tokenizer.get_vocab()["sks</w>"]]
    assert text_encoder.get_input_embeddings().weight.shape[0] == rows == len(tokenizer)
    # The identifier is a word of its own in a caption, not a copy of the class noun.
    caption = token_ids_of(tokenizer, "a photo of sks triangle")
    assert caption[3] == ident.token_ids[0] and caption != token_ids_of(tokenizer, "a photo of triangle triangle")


@pytest.mark.parametrize("token, message", [
    ("zwx", "concept.token 'zwx' is not a token of the tokenizer's vocabulary (it splits into 2); lora trains no"),
    ("triangle", "concept.token 'triangle' is a word of the class noun, captions or prompts"),
])
def test_methods_without_learned_embeddings_refuse_other_tokens(tokenizer, text_encoder, token, message):
    with pytest.raises(TrainerInputError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        setup_identifier(tokenizer, text_encoder, token, learns_embedding=False, method="lora",
                         exclude_texts=["a photo of {token} {class_noun}", "triangle"])
    assert "token: auto" in str(err.value)
    assert len(tokenizer) == 49408  # nothing was added on the way
