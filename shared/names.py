"""What a name that travels between parties may be: site ids, condition names, cell-type labels.

Names reach other sites (in the composite, in their label columns and reports), so a name is
refused when it could mislead a person or a program: control, format (bidirectional override)
or unassigned characters, path-like parts (``/`` inside a batch, ``.`` or ``..``), surrounding
spaces, a form that Unicode compatibility normalisation (NFKC) would change, or, for a label, a
*skeleton* equal to another label's: the same letters once case, accents and the common
Latin/Greek/Cyrillic look-alikes are folded (Greek capital alpha "Α" for Latin "A", Cyrillic
"о" for "o", ...), so a new label cannot pass for a known one.
"""

from __future__ import annotations

import re
import unicodedata

MAX_SITE_ID = 64
MAX_BATCH = 128
MAX_LABEL = 128
RESERVED_LABELS = frozenset({"unknown"})  # what label transfer calls a cell it cannot place
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# look-alikes of Latin letters and digits in Greek and Cyrillic (after case folding)
_LOOKALIKES = {
        **dict.fromkeys("αа", "a"), "β": "b", **dict.fromkeys("ϲс", "c"),
        **dict.fromkeys("εе", "e"),
        "һ": "h", **dict.fromkeys("ιіӏ", "i"), "ј": "j", **dict.fromkeys("κк", "k"),
        "м": "m", "η": "n", **dict.fromkeys("οо", "o"), **dict.fromkeys("ρр", "p"),
        "ԛ": "q", "ѕ": "s", **dict.fromkeys("τт", "t"), **dict.fromkeys("υу", "y"),
        **dict.fromkeys("χх", "x"), "ν": "v", "ω": "w", "ζ": "z", "0": "o", "1": "l",
}  # fmt: skip
_CONFUSABLES = str.maketrans(_LOOKALIKES)


def _unsafe_characters(text: str) -> str:
    """The characters of ``text`` a name must not hold (control, format, unassigned, private
    use, surrogate, or separators other than a plain space), shown escaped."""
    bad = {c for c in text if unicodedata.category(c)[0] in "CZ" and c != " "}
    return ", ".join(sorted(c.encode("unicode_escape").decode("ascii") for c in bad))


def _text_problem(text: str, what: str, max_len: int) -> str:
    if not text:
        return f"{what} is empty"
    if len(text) > max_len:
        return f"{what} has {len(text):,} characters, at most {max_len}"
    unsafe = _unsafe_characters(text)
    if unsafe:
        return f"{what} {text[:40]!r} holds control or invisible characters ({unsafe})"
    if text != text.strip():
        return f"{what} {text!r} starts or ends with a space"
    if unicodedata.normalize("NFKC", text) != text:
        return f"{what} {text!r} is not in Unicode NFKC form"
    return ""


def site_id_problem(site_id: str) -> str:
    """Why ``site_id`` is not a valid site id ("" when it is): ASCII letters, digits, ``.``,
    ``_`` and ``-``, starting with a letter or digit, at most :data:`MAX_SITE_ID` long."""
    if not isinstance(site_id, str) or not _SITE_ID.fullmatch(site_id):
        return (
            f"site id {str(site_id)[:40]!r} must be ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if len(site_id) > MAX_SITE_ID:
        return f"site id has {len(site_id)} characters, at most {MAX_SITE_ID}"
    return ""


def condition_problem(name: str, site_id: str) -> str:
    """Why ``name`` is not a condition of ``site_id`` ("" when it is): ``SITE_ID/BATCH`` with a
    batch name that is safe to show and not path-like."""
    site, slash, batch = name.partition("/")
    if site != site_id or not slash:
        return f"condition {name[:80]!r} is outside site {site_id!r}'s namespace ({site_id}/BATCH)"
    if "/" in batch or batch in (".", ".."):
        return f"condition {name[:80]!r}: the batch name must not be path-like"
    problem = _text_problem(batch, "batch name", MAX_BATCH)
    return f"condition of site {site_id!r}: {problem}" if problem else ""


def label_problem(label: str) -> str:
    """Why ``label`` is not a valid cell-type label ("" when it is)."""
    problem = _text_problem(label, "label", MAX_LABEL)
    if problem:
        return problem
    if label.casefold() in RESERVED_LABELS:
        return f"label {label!r} is reserved for cells that cannot be placed"
    return ""


def skeleton(label: str) -> str:
    """The form two labels that look alike share: NFKD without accents, case-folded, with
    Greek/Cyrillic look-alikes and 0/1 mapped to Latin letters."""
    decomposed = unicodedata.normalize("NFKD", label)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.casefold().translate(_CONFUSABLES)
