"""Small shared helpers for the scorers: tolerant JSON / JSON Lines reading and VLMEvalKit's yes/no extraction.

Pure Python, no third-party imports.
"""
from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PathLike = str | Path

__all__ = ["first_key", "read_json_any", "read_json_records", "vlmevalkit_yorn", "with_flags"]


def with_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the Python keyword hints the scorers give (``zero_division='zero'``, ``strict=True``)
    rewritten as the command-line options that set them. ``flags`` maps a keyword to the option, with ``{}`` where
    the value goes: ``{"zero_division": "--zero-division {}", "strict": "--strict"}``."""
    if not flags:
        return message
    pattern = r"\b(" + "|".join(map(re.escape, flags)) + r")=(?:'([^']*)'|(True|False|None)\b)"
    return re.sub(pattern, lambda m: flags[m.group(1)].format(m.group(2) if m.group(2) is not None else m.group(3)),
                  message)


def _read_text(path: PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    raw = p.read_bytes()
    if p.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return decode_text(raw, p)


def decode_text(raw: bytes, path: PathLike) -> str:
    """``raw`` as UTF-8 text (a BOM dropped, CRLF / CR line endings normalised to LF); a file that is not UTF-8
    raises a ConfigError (a ValueError) naming ``path``, the byte offset and its line."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        from vtoolkit.config import ConfigError

        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{raw[e.start]:02x} at offset {e.start}, line "
                          f"{line}: {e.reason}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json_any(path: PathLike) -> Any:
    """Parse a ``.json`` / ``.json.gz`` file holding one JSON value (object or array)."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_json_records(path: PathLike) -> list:
    """Read a list of records from JSON Lines *or* a JSON array (the extension does not matter).

    - ``\\r`` is stripped (the official COCO POPE popular/adversarial files are CRLF), a UTF-8 BOM is ignored;
    - blank lines are skipped;
    - a file whose first non-blank character is ``[`` is parsed as one JSON array (the SEEM POPE files are
      pretty-printed arrays);
    - a single pretty-printed JSON object spanning several lines is returned as a one-element list.
    """
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: starts with '[' but is not a valid JSON array ({e})") from e
        if not isinstance(data, list):  # pragma: no cover - json.loads of '[...' is always a list
            raise ValueError(f"{path}: expected a JSON array")
        return data
    records = []
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            # maybe one pretty-printed JSON value
            try:
                whole = json.loads(stripped)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i}: not valid JSON Lines ({e.msg}); the file is neither JSON Lines nor "
                                 f"a JSON array") from e
            return whole if isinstance(whole, list) else [whole]
    return records


def first_key(record: dict, keys, what: str, where: str):
    """Return ``(key, record[key])`` for the first of ``keys`` present in ``record``, or raise a clear KeyError."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for k in keys:
        if k in record:
            return k, record[k]
    raise KeyError(f"{where}: no {what} field; expected one of {list(keys)}, found keys {sorted(record)}")


# ---------------------------------------------------------------------------------------------------------------
# VLMEvalKit YOrN_Extraction (open-compass/VLMEvalKit @ e8e78f0, vlmeval/dataset/utils/yorn.py + process_punctuation)
# Re-implemented from its observable behaviour:
#   1. lower-case;
#   2. for each of 21 punctuation characters: if the character occurs next to a space anywhere in the text (or the text
#      contains a digit,digit pattern), delete every occurrence of it, else replace every occurrence with a space;
#   3. delete "." unless it is followed by a digit.  Two upstream quirks are kept: the look-behind is written
#      ``(?!<=\d)`` (a look-*ahead* for the literal "<=digit", so "3.5"-style protection only looks forward), and the
#      substitution is called as ``sub('', text, re.UNICODE)`` so at most 32 periods are removed;
#   4. split on whitespace: "Yes" iff "yes" is a token and "no" is not, "No" in the mirror case, else "Unknown".
# ---------------------------------------------------------------------------------------------------------------
_VLM_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_VLM_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
_VLM_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VLM_MAX_PERIODS = 32  # == re.UNICODE passed positionally as ``count`` upstream


def _vlm_process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _VLM_COMMA_DIGITS.search(text) is not None
    for p in _VLM_PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VLM_PERIOD.sub("", out, count=_VLM_MAX_PERIODS)


def vlmevalkit_yorn(answer: str) -> str:
    """VLMEvalKit ``YOrN_Extraction``: returns ``"Yes"``, ``"No"`` or ``"Unknown"`` (exact matching, no LLM judge)."""
    words = _vlm_process_punctuation(str(answer).lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    return "Unknown"
