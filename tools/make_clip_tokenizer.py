"""Write CLIP's `vocab.json` and `merges.txt` from open_clip's `bpe_simple_vocab_16e6.txt.gz`.

The Hugging Face CLIP tokenizer files are derived from the same BPE list that OpenAI's
`simple_tokenizer.py` reads; rebuilding them here lets SDAccel ship them without the hub.
Usage: python tools/make_clip_tokenizer.py PATH/TO/bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def main() -> None:
    bpe_gz, out = Path(sys.argv[1]), Path(sys.argv[2])
    encoder, merges = build(bpe_gz)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(encoder)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main()
