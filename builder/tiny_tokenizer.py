"""A tiny synthetic CLIP BPE tokenizer, written as real tokenizer files.

The tiny presets (and the ``--random-weights`` mode, which has no real vocabulary offline) need a
tokenizer that behaves like CLIP's: lower-casing, CLIP's pre-tokenization regex, byte-level base
alphabet, ``</w>`` end-of-word suffix, ``<|startoftext|>`` / ``<|endoftext|>`` around every sequence,
77 positions. The vocabulary is what is synthetic: the 512 byte-level base tokens plus a few hundred
merges learned, deterministically, from a small embedded prompt corpus, plus the two special tokens
(last, like CLIP's 49406 / 49407). Its size is :data:`TINY_VOCAB_SIZE`.

:func:`write_tiny_clip_tokenizer` writes ``vocab.json``, ``merges.txt``, ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``. ``transformers.CLIPTokenizer`` /
``CLIPTokenizerFast`` and ``tokenizers.Tokenizer.from_file(dir / "tokenizer.json")`` all give the
same ids for ordinary English prompts. Every file is a pure function of ``pad_token``: the bytes
are identical on every call. Only ``tokenizers`` is needed (no torch, no transformers).
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
NUM_MERGES = 400
# Bump when the vocabulary / merges / file layout change (part of the preset fingerprints).
TOKENIZER_VERSION = 2

# CLIP's pre-tokenization pattern (special tokens, contractions, letter runs, single digits, punctuation).
_CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Prompt-like English text the merges are learned from. Changing it changes the vocabulary: bump
# TOKENIZER_VERSION when you do.
_CORPUS_TEXT = """
a photo of a cat . a photo of a dog . an astronaut riding a horse on mars . a painting of a fox
sitting in a field at sunrise . a cinematic shot of a baby racoon wearing an intricate italian
priest robe . a close up portrait of an old man with a beard , studio lighting , highly detailed .
a castle on a hill above the sea , digital art , trending on artstation . a bowl of fruit on a
wooden table , still life , oil painting . a futuristic city at night with neon lights and flying
cars . a red sports car driving through the mountains , golden hour . a cute corgi puppy playing
in the snow . a watercolor painting of a lighthouse during a storm . an ancient temple in the
jungle covered with vines . a robot reading a book in a library . a teddy bear swimming in the
ocean , underwater photography . a beautiful landscape with a river , trees and blue sky , sharp
focus , 8k , ultra realistic . a woman wearing a yellow dress walking in the rain . a bird flying
over a lake with reflections . a plate of pasta with tomato sauce and basil , food photography .
a small house in the forest with a warm light in the window , fantasy illustration . portrait of
a young girl with green eyes and freckles , soft light . a cup of coffee on a desk next to a
laptop . a black and white photograph of a street in paris . an elephant standing in the desert
under the stars . a dragon breathing fire over a medieval village . a sailing boat on a calm sea
at sunset , wide angle . a vase of flowers , roses and tulips , pastel colors . a knight in shining
armor holding a sword . a snowy mountain peak reflected in a frozen lake . a lion resting in the
tall grass , national geographic . a colorful hot air balloon floating above the clouds . a
steampunk airship with brass gears . an owl perched on a branch in the moonlight . the face of a
smiling child , canon camera , bokeh . a train crossing a bridge over a canyon . a bright kitchen
with white cabinets and plants . a monkey eating a banana in a tree . a horse running on the beach
"""

# The tiny presets' shapes language (shape_prompts.py): enough sentences that each of its words is one
# token of the vocabulary (a test checks it).
_SHAPES_TEXT = """
a red circle on a blue background . a small yellow square at the top left on a black background .
a large green triangle at the bottom right on a white background . a white circle in the center on a
purple background . an orange square at the top right on a green background . a purple triangle at the
bottom left on a yellow background . a black circle on an orange background . a blue square in the center
on a red background . a small white triangle at the top on a blue background . a large yellow circle at the
left on a purple background . a small orange circle at the right on a black background . a large black
square at the bottom on a white background .
"""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte alphabet: every byte maps to one printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    # Printable bytes map to themselves and come first; the others follow, shifted past 255.
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + len(mapping) - len(printable))
    return mapping


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on the embedded corpus; ties broken by the pair's text, so the result is fixed."""
    byte_map = _bytes_to_unicode()
    word_counts = Counter(w.lower() for w in (_CORPUS_TEXT + _SHAPES_TEXT * 3).split())
    words: dict[tuple[str, ...], int] = {}
    for word, count in sorted(word_counts.items()):
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] = words.get(tuple(chars), 0) + count
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """The vocabulary (token, id) in id order and the merges, cached (immutable)."""
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    merges = _learn_merges(NUM_MERGES)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:  # two merges may produce the same string; keep one vocab entry
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return tuple((t, i) for i, t in enumerate(tokens)), tuple(merges)


def tiny_vocab_size() -> int:
    """Number of ids of the tiny tokenizer (the tiny text encoders' ``vocab_size``)."""
    return len(_vocab_and_merges()[0])


def tiny_special_token_ids() -> dict[str, int]:
    """Ids of ``<|startoftext|>`` and ``<|endoftext|>`` (the two highest ids, as in CLIP)."""
    vocab = dict(_vocab_and_merges()[0])
    return {BOS_TOKEN: vocab[BOS_TOKEN], EOS_TOKEN: vocab[EOS_TOKEN]}


def _tokenizer_json(pad_token: str) -> str:
    """Serialize the tokenizer with the ``tokenizers`` library, mirroring CLIP's pipeline.

    Like ``transformers`` does, a pad token other than the special tokens (SD 2's ``"!"``) is an
    added special token: a ``"!"`` in a prompt is then always its own token (id 0), never merged.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab_items, merges = _vocab_and_merges()
    vocab = dict(vocab_items)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=list(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]), trim_offsets=False, add_prefix_space=False
    )
    if pad_token not in (BOS_TOKEN, EOS_TOKEN):
        tok.add_special_tokens([AddedToken(pad_token, normalized=False, special=True)])
    tok.add_special_tokens([AddedToken(t, normalized=True, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
    # Round-trip through json to get a stable, indented, key-sorted rendering.
    return json.dumps(json.loads(tok.to_str()), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_tiny_clip_tokenizer(directory: Path, pad_token: str) -> None:
    """Write the tiny CLIP tokenizer files into ``directory`` (created if needed).

    ``pad_token`` is ``"!"`` for SD-Turbo's tokenizer and SDXL's second tokenizer, ``"<|endoftext|>"``
    for SDXL's first tokenizer; it must be a token of the vocabulary.
    """
    vocab_items, merges = _vocab_and_merges()
    vocab = dict(vocab_items)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the tiny vocabulary")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    files = {
        "vocab.json": json.dumps(vocab, indent=2, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer.json": _tokenizer_json(pad_token),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
    }
    for name, text in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(directory / name)


def tiny_tokenizer_fingerprint(pad_token: str) -> str:
    """A sha256 that changes whenever the files :func:`write_tiny_clip_tokenizer` writes could change.

    Cheap (no merge learning): it hashes this module's source, the pad token and the ``tokenizers``
    version (which renders ``tokenizer.json``).
    """
    import hashlib
    from importlib import metadata

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"\0{pad_token}\0{TOKENIZER_VERSION}\0{metadata.version('tokenizers')}".encode())
    return digest.hexdigest()
