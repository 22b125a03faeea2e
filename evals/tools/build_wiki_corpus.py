#!/usr/bin/env python
"""Build the Wikipedia prose corpora used by densetomoe.

Reads the English Wikipedia XML dump excerpt that ships with gensim 4.4.0's test
data (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``),
keeps main-namespace, non-redirect articles, strips the wiki markup with
mwparserfromhell and cleans the result into plain prose paragraphs.

Articles are split deterministically by title:

* held-out (evaluation only, embedded for the suites):  ``int(sha1(title).hexdigest(), 16) % 3 == 0``
* calibration (embedded in the package): everything else

Output: UTF-8 text, one paragraph per line, gzip-compressed with a fixed mtime
and no embedded file name, so the build is byte-reproducible.

gensim itself is never imported (only its data file is located), so the only
third-party requirement is ``mwparserfromhell``.

Usage::

    python evals/tools/build_wiki_corpus.py
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import mwparserfromhell
from mwparserfromhell.nodes import Comment, Heading, Node, Tag, Template, Text, Wikilink
from mwparserfromhell.wikicode import Wikicode

REPO_ROOT = Path(__file__).resolve().parents[2]
DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_CALIB = REPO_ROOT / "densetomoe" / "corpus" / "wiki_calib.txt.gz"
DEFAULT_HELDOUT = REPO_ROOT / "densetomoe" / "corpus" / "wiki_heldout.txt.gz"
MIN_WORDS = 20

# Marks a hole punched into a sentence (formula, unrendered inline template);
# paragraphs containing it are discarded rather than emitted with a gap.
HOLE = "\ue000"

# Links to media and categories are not running text.
MEDIA_LINK = re.compile(r"^\s*(file|image|media|category)\s*:", re.I)
# Interwiki / interlanguage prefixes ("fr:", "wikt:"); dropped only when they have no label.
INTERWIKI_LINK = re.compile(r"^\s*:?\s*([a-z]{2,3}(-[a-z]+)?|wikt|wiktionary|commons|species|meta)\s*:", re.I)
# Tags whose content is never prose: removed silently.
DROP_TAGS = {"table", "ref", "references", "gallery", "timeline", "imagemap", "pre",
             "poem", "div", "center", "graph", "templatedata", "inputbox", "categorytree"}
# Inline tags whose content cannot be rendered as plain text: they leave a HOLE.
HOLE_TAGS = {"math", "chem", "ce", "score", "hiero", "syntaxhighlight", "source"}
# Simple <math> content that reads fine verbatim, e.g. "n = 1" or "x + y".
SIMPLE_MATH = re.compile(r"^[A-Za-z0-9 +\-=<>().,/]{1,30}$")
# Templates that may sit inside a sentence but carry no text of their own:
# citations, footnotes and maintenance tags; pronunciation guides.
SILENT_TEMPLATE = re.compile(
    r"^(cite|citation|sfn|harv|efn|refn|#tag|rp$|r$|ref|isbn|issn|oclc|doi"
    r"|dead link|clarify|when|who$|which$|where$|by whom|according to whom|better source"
    r"|page needed|pages needed|qualify|dubious|vague|failed verification|verify"
    r"|specify|update|inflation-fn|anchor|weasel|peacock|unreliable|disputed|cn$|fact$"
    r"|ipac-|ipa-|audio|pronunciation|respell|lang-?[a-z]*-icon|[a-z]{2} icon|wayback"
    r"|webarchive|toc|clear|-|nowrap (begin|end)|main|see also|further|details|portal)", re.I)
# Unit codes of {{convert}} that do not read well verbatim.
UNITS = {"km2": "km²", "m2": "m²", "sqmi": "sq mi", "sqft": "sq ft", "ft2": "sq ft",
         "F": "°F", "C": "°C", "acre": "acres"}
# Wikitext line prefixes for lists, tables, headings, indents and directives.
NON_PROSE_LINE = re.compile(r"^\s*([*#:;|!=]|\{\||\|\}|__|----)")
# Anything that still looks like markup after stripping; such paragraphs are dropped.
MARKUP_LEFTOVER = re.compile(
    r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|\||==|</?[a-zA-Z][^>]*>|&[a-z]+;|https?://|www\.|" + HOLE)


def find_dump() -> Path:
    """Return the path of the Wikipedia excerpt inside gensim's test data (without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gensim is not installed; pass --dump explicitly")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / DUMP_NAME


def local_name(tag: str) -> str:
    """Strip the XML namespace from an element tag: '{ns}page' -> 'page'."""
    return tag.rsplit("}", 1)[-1]


def iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """Yield (title, wikitext) for main-namespace, non-redirect pages of a bz2 XML dump."""
    with bz2.open(dump, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if local_name(elem.tag) != "page":
                continue
            fields = {local_name(child.tag): child for child in elem}
            title = fields["title"].text or ""
            ns = fields["ns"].text if "ns" in fields else "0"
            revision = fields.get("revision")
            text_el = None if revision is None else \
                next((c for c in revision if local_name(c.tag) == "text"), None)
            text = (text_el.text or "") if text_el is not None else ""
            is_redirect = "redirect" in fields or text.lstrip().upper().startswith("#REDIRECT")
            if ns == "0" and not is_redirect and text.strip():
                yield title, text
            elem.clear()


def is_heldout(title: str) -> bool:
    """Deterministic article-level split: one third of titles (by SHA-1) go to held-out."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 3 == 0


def positional(template: Template) -> list[str]:
    """Return the positional (unnamed) parameter values of a template as stripped strings."""
    return [str(p.value).strip() for p in template.params if not p.showkey]


def render_template(template: Template) -> str | None:
    """Render the inline templates that carry running text; None if it has no rendering here.

    Without this, e.g. ``{{convert|60|mi|km}}`` or ``{{lang|fr|...}}`` would punch
    holes into otherwise good sentences.
    """
    name = str(template.name).strip().lower().replace("_", " ")
    args = positional(template)
    if name in ("convert", "cvt") and len(args) >= 2:
        if args[1] in ("to", "-", "–", "and", "or", "by", "x") and len(args) >= 4:
            return f"{args[0]} {args[1]} {args[2]} {UNITS.get(args[3], args[3])}"
        return f"{args[0]} {UNITS.get(args[1], args[1])}"
    if (name in ("lang", "transl") or name.startswith("lang-")) and args:
        return args[-1]
    if name in ("nihongo", "nowrap", "nobr", "small", "smaller", "big", "sc", "smallcaps",
                "ipa", "vr", "val", "mvar", "math", "bibleref") and args:
        return " ".join(args[:3]) if name == "bibleref" else args[0]
    if name == "chem" and args:
        return "".join(args)
    if name in ("frac", "sfrac") and len(args) >= 2:
        return f"{args[-2]}/{args[-1]}" if len(args) == 2 else f"{args[0]} {args[1]}/{args[2]}"
    if name == "angbr" and args:
        return f"⟨{args[0]}⟩"
    if name.startswith("formatnum:"):
        return str(template.name).split(":", 1)[1]
    if name == "as of" and args:
        lower = template.has("lc") and str(template.get("lc").value).strip()
        return ("as of " if lower else "As of ") + " ".join(args[:3])
    if name in ("nbsp", "thinsp"):
        return " "
    if name in ("snd", "spnd", "ndash", "spaced ndash"):
        return " – "
    if name in ("mdash", "mdashb"):
        return "—"
    if name in ("quote", "quotation", "blockquote") and args:
        return "\n\n" + args[0] + "\n\n"
    return None


def is_standalone(code: Wikicode, node: Node) -> bool:
    """True if a top-level node sits on a line of its own (hatnote, infobox, navbox...).

    Neighbouring templates, comments and tags on the same line are looked through, so
    ``{{Infobox ...}}{{Other uses}}`` counts as standalone.
    """
    nodes = code.nodes
    idx = next((k for k, n in enumerate(nodes) if n is node), None)
    if idx is None:
        return False  # nested inside a link, italics, another tag...: inline

    def line_edge(step: int) -> bool:
        k = idx + step
        while 0 <= k < len(nodes):
            n = nodes[k]
            if isinstance(n, Text):
                s = str(n)
                if s.strip(" \t"):
                    return (s.rstrip(" \t").endswith("\n") if step < 0
                            else s.lstrip(" \t").startswith("\n"))
            elif not isinstance(n, (Template, Comment, Tag)):
                return False
            k += step
        return True  # start or end of the text

    return line_edge(-1) and line_edge(+1)


def replacement(code: Wikicode, node: Node) -> str | None:
    """Decide what replaces a node: None keeps it, '' drops it, HOLE marks a gap."""
    if isinstance(node, (Heading, Comment)):
        return ""
    if isinstance(node, Template):
        rendered = render_template(node)
        if rendered is not None:
            return rendered
        name = str(node.name).strip()
        if SILENT_TEMPLATE.match(name) or is_standalone(code, node):
            return ""
        return HOLE
    if isinstance(node, Tag):
        tag = str(node.tag).strip().lower()
        if tag in DROP_TAGS:
            return ""
        if tag == "math":
            body = str(node.contents or "").strip()
            return body if SIMPLE_MATH.match(body) else HOLE
        if tag in HOLE_TAGS:
            return HOLE
        if tag in ("nowiki", "code"):
            return str(node.contents or "")
        if tag == "blockquote":
            return "\n\n" + str(node.contents or "") + "\n\n"
        if tag == "br":
            return " "
        return None
    if isinstance(node, Wikilink):
        title = str(node.title)
        if MEDIA_LINK.match(title) or (node.text is None and INTERWIKI_LINK.match(title)):
            return ""
    return None


def prune(code: Wikicode) -> Wikicode:
    """Replace or remove every non-prose node (at any depth) of parsed wikicode in place."""
    for node in code.filter(recursive=True):
        if isinstance(node, Text):
            continue
        new = replacement(code, node)
        if new is None:
            continue
        try:
            if new:
                code.replace(node, new)
            else:
                code.remove(node)
        except ValueError:  # already gone together with an enclosing node
            pass
    return code


def remove_non_prose(wikitext: str) -> str:
    """Remove templates, headings, comments, tables, refs, media/category links from wikitext."""
    return str(prune(mwparserfromhell.parse(wikitext)))


def raw_paragraphs(wikitext: str) -> Iterator[str]:
    """Group prose lines of (reduced) wikitext into paragraphs.

    Blank lines and non-prose lines (lists, tables, headings, indents) end a paragraph,
    following MediaWiki's rendering where consecutive text lines form one paragraph.
    """
    buf: list[str] = []
    for line in wikitext.splitlines():
        if not line.strip() or NON_PROSE_LINE.match(line):
            if buf:
                yield " ".join(buf)
                buf = []
            continue
        buf.append(line.strip())
    if buf:
        yield " ".join(buf)


def strip_markup(paragraph: str) -> str:
    """Render one wikitext paragraph to plain text with mwparserfromhell."""
    return prune(mwparserfromhell.parse(paragraph)).strip_code(normalize=True, collapse=True)


def tidy(text: str) -> str:
    """Fix whitespace and punctuation damage left behind by removed templates and refs."""
    text = text.replace("\u00a0", " ").replace("\u200b", "")
    text = re.sub(r"'{2,}", "", text)                             # stray bold/italic quotes
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", text)                # "(; , born" -> "(born"
    text = re.sub(r"(?:\s*[,;:])+\s*\)", ")", text)                # "BC; )" -> "BC)"
    text = re.sub(r"\(\s*[.\u2013\u2014-]*\s*\)", "", text)          # "()" left by pronunciations
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)           # ":, " -> ":"
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", text)                # no space before punctuation
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r"([a-z]{2}[.!?])([A-Z][a-z])", r"\1 \2", text)  # "homeless.The" -> "homeless. The"
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def is_clean_prose(text: str, min_words: int = MIN_WORDS) -> bool:
    """Accept a paragraph only if it is long enough, markup-free and reads like a sentence."""
    if len(text.split()) < min_words or MARKUP_LEFTOVER.search(text):
        return False
    if not (text[0].isupper() or text[0].isdigit() or text[0] in "\"'(\u201c\u2018"):
        return False  # starts mid-sentence, e.g. its subject sat in a removed template
    return text[-1] in ".!?\"')\u201d\u2019"


def article_paragraphs(wikitext: str, min_words: int = MIN_WORDS) -> list[str]:
    """Return the clean prose paragraphs of one article."""
    out = []
    for raw in raw_paragraphs(remove_non_prose(wikitext)):
        text = tidy(strip_markup(raw))
        if is_clean_prose(text, min_words):
            out.append(text)
    return out


def write_gzip_lines(path: Path, lines: list[str]) -> None:
    """Write lines as UTF-8 text to a byte-reproducible gzip file (mtime=0, no file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=9, mtime=0) as gz:
        gz.write(data)


def build(dump: Path, min_words: int = MIN_WORDS) -> dict[str, dict]:
    """Parse the dump and return {'calib'|'heldout': {'articles': [...], 'lines': [...]}}."""
    splits = {"calib": {"articles": [], "lines": []}, "heldout": {"articles": [], "lines": []}}
    for title, wikitext in iter_articles(dump):
        paragraphs = article_paragraphs(wikitext, min_words)
        if not paragraphs:
            continue
        split = splits["heldout" if is_heldout(title) else "calib"]
        split["articles"].append(title)
        split["lines"].extend(paragraphs)
    return splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults reproduce the committed files."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", type=Path, default=None,
                    help="bz2 XML dump (default: the excerpt in gensim's test data)")
    ap.add_argument("--calib-out", type=Path, default=DEFAULT_CALIB,
                    help="calibration split (default: %(default)s)")
    ap.add_argument("--heldout-out", type=Path, default=DEFAULT_HELDOUT,
                    help="held-out split (default: %(default)s)")
    ap.add_argument("--min-words", type=int, default=MIN_WORDS,
                    help="drop paragraphs with fewer words (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build both splits, write them, and print per-split counts."""
    args = parse_args(argv)
    dump = args.dump or find_dump()
    splits = build(dump, args.min_words)
    write_gzip_lines(args.calib_out, splits["calib"]["lines"])
    write_gzip_lines(args.heldout_out, splits["heldout"]["lines"])
    print(f"source: {dump}")
    for name, path in (("calib", args.calib_out), ("heldout", args.heldout_out)):
        s = splits[name]
        words = sum(len(line.split()) for line in s["lines"])
        print(f"{name:8s} articles={len(s['articles']):4d} paragraphs={len(s['lines']):5d} "
              f"words={words:7d} bytes={path.stat().st_size:8d} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
