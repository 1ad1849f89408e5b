"""The concept's unique identifier: rare tokens of the vocabulary (`token: auto`) or the user's token.

DreamBooth (Ruiz et al., 2022) binds the concept to rare tokens: for CLIP's BPE vocabulary the merge rank
is the frequency proxy (a later merge, i.e. a higher id, is rarer). We take the highest-id
plain word tokens (`[a-z]{1,3}</w>`, like "sks"), decode them to text and keep only those whose
text tokenizes back to exactly the same ids.

Each method follows its own recipe. Methods that learn a token embedding (textual inversion,
custom diffusion, TI-DreamBooth's stage 1) need a *new* row in the embedding table, so they add a
new token: the user's token (which must not be in the vocabulary yet), or for `auto` the rare text
in angle brackets (`<lun>`), which cannot collide with a word of the vocabulary and is never
matched inside another word. DreamBooth and LoRA train no embedding, so a new row would stay at
its initial value (the class noun's: "zwx dog" would encode like "dog dog"); they use an
*existing* rare token as it is: the user's (`sks`) or the rare tokens `auto` picks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection, Iterable, Optional

import torch

from personalize.errors import TrainerInputError

PLAIN_WORD = re.compile(r"[a-z]{1,3}</w>")


@dataclass
class Identifier:
    text: str  # what goes into captions and prompts ("lun", "<lun>", or "<lun> <lun>_1" multi-vector)
    token: str  # the token name (for pipe.load_textual_inversion(path, token=...))
    token_ids: list[int]  # the ids the text maps to (new rows when `added`)
    added: bool  # new rows were added to the tokenizer / embedding table
    rare_tokens: list[str] = field(default_factory=list)  # vocabulary entries chosen by `auto`
    # The ids of the same token names in further text encoders' tokenizers, by component name
    # (SDXL's text_encoder_2); `token_ids` are the first text encoder's.
    more_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.text.split(" ")

    def ids_in(self, encoder_name: str) -> list[int]:
        """The identifier's ids in the tokenizer of the named text encoder component."""
        return self.more_token_ids.get(encoder_name, self.token_ids)


def token_ids_of(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def exists_in_vocabulary(tokenizer, token: str) -> bool:
    """True when `token` is already an entry (or a single word) of the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab:
        return True
    return len(token_ids_of(tokenizer, token)) == 1


def words_in(texts: Iterable[str]) -> set[str]:
    return {w for text in texts for w in re.findall(r"[a-z0-9]+", text.lower())}


def pick_rare_tokens(tokenizer, count: int, exclude: Iterable[str] = ()) -> list[int]:
    """The `count` rarest plain word tokens whose text round-trips, skipping excluded words and
    tokens that were already added to this tokenizer (e.g. other concepts' tokens)."""
    excluded = set(exclude) | set(tokenizer.get_added_vocab())
    vocab = tokenizer.get_vocab()
    chosen: list[int] = []
    for entry, token_id in sorted(vocab.items(), key=lambda kv: -kv[1]):
        if not PLAIN_WORD.fullmatch(entry):
            continue
        text = entry[: -len("</w>")]
        if text in excluded or entry in excluded or f"<{text}>" in excluded:  # <text>: another concept's placeholder
            continue
        if token_ids_of(tokenizer, text) != [token_id]:
            continue
        chosen.append(token_id)
        if len(chosen) == count:
            return chosen
    raise TrainerInputError(f"could not find {count} rare tokens in the tokenizer's vocabulary")


def decode_rare_tokens(tokenizer, token_ids: list[int]) -> str:
    """The short text of rare tokens; it must tokenize back to exactly `token_ids`."""
    text = tokenizer.decode(token_ids).strip()
    if token_ids_of(tokenizer, text) != token_ids:
        raise TrainerInputError(f"rare tokens {token_ids} do not round-trip through the tokenizer")
    return text


def _initial_embedding(tokenizer, embeddings: torch.nn.Embedding, initializer: Optional[str]) -> torch.Tensor:
    """The row new tokens start from: the initializer word (mean of its pieces), else the mean row."""
    table = embeddings.weight.data
    if not initializer:
        return table.mean(dim=0)
    ids = token_ids_of(tokenizer, initializer)
    if not ids:
        raise TrainerInputError(f"initializer token {initializer!r} is empty after tokenization")
    return table[ids].mean(dim=0)


def add_tokens(tokenizer, text_encoder, token: str, num_vectors: int, initializer: Optional[str],
               reusable: Collection[str] = ()) -> Identifier:
    """Add `token` (and `token_1` ... for multi-vector embeddings) and grow the embedding table.
    Names in `reusable` that the tokenizer has already added (a pack's departed concepts' tokens:
    a shared tokenizer cannot drop one) are taken over instead; all rows start from the initializer."""
    names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    vocab = tokenizer.get_vocab()  # added tokens included
    new = [name for name in names if not (name in reusable and name in vocab)]
    # checked before adding: add_tokens would add the other names and leave them without rows
    if any(name in vocab for name in new) or tokenizer.add_tokens(new) != len(new):
        raise TrainerInputError(f"token {token!r} (or one of {names}) already exists in the tokenizer")
    new_ids = [tokenizer.convert_tokens_to_ids(name) for name in names]
    init = _initial_embedding(tokenizer, text_encoder.get_input_embeddings(), initializer)
    if new:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for new_id in new_ids:
            table[new_id] = init
    return Identifier(text=" ".join(names), token=token, token_ids=new_ids, added=True)


def existing_token(tokenizer, token: str, method: str) -> Identifier:
    """A user's identifier for a method that trains no embedding: one token of the vocabulary."""
    ids = token_ids_of(tokenizer, token)
    if len(ids) != 1:
        raise TrainerInputError(
            f"concept.token {token!r} is not a token of the tokenizer's vocabulary (it splits into {len(ids)}); "
            f"{method} trains no token embedding, so its identifier must be an existing rare token: "
            "use token: auto or a rare word such as 'sks'"
        )
    entry = tokenizer.convert_ids_to_tokens(ids)[0]
    return Identifier(text=token, token=token, token_ids=ids, added=False, rare_tokens=[entry])


def setup_identifier(
    tokenizer,
    text_encoder,
    token: str,
    *,
    learns_embedding: bool,
    num_identifier_tokens: int = 1,
    num_vectors: int = 1,
    initializer: Optional[str] = None,
    exclude_texts: Iterable[str] = (),
    method: str = "this method",
    reusable: Collection[str] = (),
) -> Identifier:
    """Resolve the concept's `token` setting into an Identifier, changing tokenizer/text encoder
    in place when new tokens are needed. `reusable`: tokens of concepts that left the pack (see
    add_tokens); a new concept may train one of them again."""
    if token != "auto" and learns_embedding:
        if token not in reusable and exists_in_vocabulary(tokenizer, token):
            raise TrainerInputError(
                f"concept.token {token!r} already exists in the tokenizer's vocabulary; {method} trains a new "
                "embedding for its token: choose a word the tokenizer does not know (e.g. '<my-concept>') "
                "or use token: auto"
            )
        return add_tokens(tokenizer, text_encoder, token, num_vectors, initializer, reusable)
    if token != "auto":
        if token.lower() in words_in(exclude_texts):
            raise TrainerInputError(
                f"concept.token {token!r} is a word of the class noun, captions or prompts, so the concept "
                "could not be told apart from it: use token: auto or a rare word such as 'sks'"
            )
        return existing_token(tokenizer, token, method)

    rare_ids = pick_rare_tokens(tokenizer, num_identifier_tokens, exclude=words_in(exclude_texts))
    rare_text = decode_rare_tokens(tokenizer, rare_ids)
    rare_entries = tokenizer.convert_ids_to_tokens(rare_ids)
    if not learns_embedding:
        return Identifier(text=rare_text, token=rare_text, token_ids=rare_ids, added=False, rare_tokens=rare_entries)
    placeholder = f"<{rare_text.replace(' ', '-')}>"
    identifier = add_tokens(tokenizer, text_encoder, placeholder, num_vectors, initializer)
    identifier.rare_tokens = rare_entries
    return identifier


def add_to_more_encoders(identifier: Identifier, encoders: Iterable, initializer: Optional[str],
                         reusable: Collection[str] = ()) -> None:
    """Add a new identifier's tokens to further text encoders too (each `encoder` has `.name`,
    `.tokenizer`, `.module`), each row starting from that encoder's own initializer embedding."""
    if not identifier.added:
        return
    for encoder in encoders:
        added = add_tokens(encoder.tokenizer, encoder.module, identifier.token, len(identifier.names), initializer,
                           reusable)
        identifier.more_token_ids[encoder.name] = added.token_ids
