"""Convert open_clip's BPE vocabulary into the files transformers' CLIPTokenizer loads.

Run once (needs open_clip_torch installed, or pass the .gz path explicitly):

    python tinyworld/convert_tokenizer.py [--bpe path/to/bpe_simple_vocab_16e6.txt.gz]

Writes trainer/personalize/assets/tiny_world/tokenizer/{vocab.json,merges.txt,...}.
open_clip is only needed here, never at runtime: the product ships the converted files.

Token ids follow open_clip's SimpleTokenizer construction exactly:
  ids 0..255      the 256 byte-level symbols (GPT-2 byte-to-unicode order)
  ids 256..511    the same symbols with the end-of-word marker "</w>"
  ids 512..49405  one id per merge, in merge order (48,894 merges)
  ids 49406/49407 start-of-text / end-of-text
giving 49,408 tokens in total.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "trainer" / "personalize" / "assets" / "tiny_world" / "tokenizer"

# open_clip keeps lines 1 .. 49152-256-2 of the file (line 0 is a header): 48,894 merges.
N_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def byte_to_unicode_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode mapping (same order open_clip uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    next_free = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + next_free)
            next_free += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def find_open_clip_bpe() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise SystemExit("open_clip is not installed; pass --bpe PATH to bpe_simple_vocab_16e6.txt.gz")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merge_lines = lines[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    assert all(len(m) == 2 for m in merges), "every merge line must hold exactly two symbols"
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(byte_to_unicode_table().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, f"expected 49408 unique tokens, got {len(vocab)}"
    return vocab


def write_tokenizer(bpe_gz: Path, out_dir: Path) -> None:
    merges = read_merges(bpe_gz)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, default=None, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    write_tokenizer(args.bpe or find_open_clip_bpe(), args.out)


if __name__ == "__main__":
    main()
