"""Split source code into units, function/class-level chunks and safe block boundaries.

The coarse stage of LongCodeZip (:mod:`ctxzip.prompt.code`) ranks *chunks* - functions, classes
and runs of module-level statements - and the fine stage cuts the kept chunks into *blocks* of
lines. This module does the structural part, with no model:

* :func:`split_units` - the text as a list of units (lines with their line break; overlong lines,
  e.g. minified code, are cut into pieces) whose concatenation is exactly the input.
* :func:`detect_language` - from a file name, or by trying to parse the text.
* :func:`chunk_code` - :class:`Chunk` ranges over the units. Python goes through :mod:`ast`
  (decorators and leading comments stay with their function, methods and nested classes are
  chunks of their own with the class header as their parent, consecutive module-level
  statements form one chunk); brace languages (JS/TS, Java, Go, Rust, C/C++, C#, ...) through a
  brace-depth scanner that skips strings and comments; anything else (or Python that does not
  parse) through a line-pattern fallback; unknown text through blank-line paragraphs.
* :func:`safe_split_points` - after which units a block may end without cutting a statement in
  two (Python: logical lines from :mod:`tokenize`; others: every line).
* :func:`elision_marker` - the language-correct "code omitted" comment line.

Everything here is deterministic and never raises on malformed code: a parser failure falls
back to the next, simpler splitter.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import PurePath

__all__ = [
    "Chunk",
    "LANGUAGES",
    "split_units",
    "detect_language",
    "chunk_code",
    "safe_split_points",
    "elision_marker",
    "comment_prefix",
    "indentation",
]

# language -> comment prefix used for elision markers
_COMMENT = {
    "python": "#",
    "ruby": "#",
    "shell": "#",
    "r": "#",
    "perl": "#",
    "yaml": "#",
    "javascript": "//",
    "typescript": "//",
    "java": "//",
    "go": "//",
    "rust": "//",
    "c": "//",
    "cpp": "//",
    "csharp": "//",
    "kotlin": "//",
    "swift": "//",
    "scala": "//",
    "php": "//",
    "dart": "//",
    "sql": "--",
    "lua": "--",
    "haskell": "--",
    "text": "",
}
LANGUAGES = tuple(sorted(_COMMENT))
_BRACE_LANGS = {
    "javascript", "typescript", "java", "go", "rust", "c", "cpp", "csharp", "kotlin", "swift",
    "scala", "php", "dart",
}
_EXT = {
    ".py": "python", ".pyi": "python", ".pyw": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript",
    ".java": "java", ".go": "go", ".rs": "rust",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
    ".cs": "csharp", ".kt": "kotlin", ".kts": "kotlin", ".swift": "swift", ".scala": "scala",
    ".php": "php", ".dart": "dart", ".rb": "ruby", ".sh": "shell", ".bash": "shell",
    ".r": "r", ".pl": "perl", ".yml": "yaml", ".yaml": "yaml", ".sql": "sql", ".lua": "lua",
    ".hs": "haskell", ".txt": "text", ".md": "text",
}
_ALIASES = {
    "py": "python", "js": "javascript", "ts": "typescript", "c++": "cpp", "cxx": "cpp",
    "c#": "csharp", "cs": "csharp", "rs": "rust", "golang": "go", "sh": "shell", "bash": "shell",
    "rb": "ruby", "kt": "kotlin", "plain": "text", "txt": "text",
}


@dataclass
class Chunk:
    """A contiguous range of units ``[start, end)`` ranked as one piece by the coarse stage.

    Attributes:
        start, end: unit range (chunks of one text tile it without gaps or overlaps).
        kind: ``"function"``, ``"class"`` (a class header: class line, docstring, attributes),
            ``"module"`` (module-level statements), ``"piece"`` (part of an oversized chunk) or
            ``"text"``.
        name: function/class name where known.
        header_end: units ``[start, header_end)`` are the signature (decorators, ``def``/``class``
            line(s)); the fine stage always keeps them. ``header_end == start`` for no signature.
        parent: index of the enclosing class-header chunk (or the first piece of a split chunk);
            when a chunk is kept but its parent is not, the parent's signature is still shown so
            the kept code sits under its real header at a valid indentation.
    """

    start: int
    end: int
    kind: str = "module"
    name: str | None = None
    header_end: int = -1
    parent: int | None = None
    children: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.header_end < 0:
            self.header_end = self.start


# ---------------------------------------------------------------------- units
_BREAK_RE = re.compile(r"[;{},]\s*|\s+")


def split_units(text: str, max_line_chars: int = 400) -> list[str]:
    """Lines of ``text`` with their line breaks; a line longer than ``max_line_chars`` (minified
    code) is cut into pieces of about that size at ``; { } ,`` or whitespace (a hard cut when there
    is none). ``"".join(split_units(t)) == t`` always."""
    if max_line_chars < 16:
        raise ValueError(f"max_line_chars must be >= 16, got {max_line_chars}")
    units: list[str] = []
    for line in text.splitlines(keepends=True):
        if len(line) <= max_line_chars:
            units.append(line)
            continue
        pos = 0
        while len(line) - pos > max_line_chars:
            window = line[pos : pos + max_line_chars]
            cut = 0
            for m in _BREAK_RE.finditer(window):
                if m.end() >= max_line_chars // 2:
                    cut = m.end()
                    break
                cut = m.end()
            if cut < max_line_chars // 4:
                cut = max_line_chars
            units.append(line[pos : pos + cut])
            pos += cut
        if pos < len(line):
            units.append(line[pos:])
    return units


def indentation(unit: str) -> str:
    """Leading whitespace of a line."""
    return unit[: len(unit) - len(unit.lstrip(" \t"))]


# ---------------------------------------------------------------------- language
def normalize_language(language: str | None) -> str | None:
    """Canonical language name, ``None`` for ``None``/``"auto"``; raises on an unknown name."""
    if language is None:
        return None
    lang = language.strip().lower()
    if lang in ("", "auto"):
        return None
    lang = _ALIASES.get(lang, lang)
    if lang not in _COMMENT:
        raise ValueError(
            f"unknown language {language!r}; use 'auto' or one of: {', '.join(LANGUAGES)}"
        )
    return lang


def detect_language(text: str, filename: str | None = None) -> str:
    """Language from the file suffix, else ``python`` if the text parses as Python and looks
    like code, else a brace language (``"c"`` family scanner) if braces balance, else ``text``."""
    if filename:
        lang = _EXT.get(PurePath(filename).suffix.lower())
        if lang:
            return lang
    if re.search(r"^\s*(def|class|import|from|async def)\s", text, re.M):
        try:
            ast.parse(text)
            return "python"
        except (SyntaxError, ValueError):
            if re.search(r"^\s*(def|class)\s+\w+.*:\s*$", text, re.M):
                return "python"  # Python that does not parse: the line fallback handles it
    opens, closes = text.count("{"), text.count("}")
    if opens >= 2 and abs(opens - closes) <= max(2, opens // 10):
        return "c"
    return "text"


def comment_prefix(language: str) -> str:
    return _COMMENT.get(language, "#")


def elision_marker(language: str, indent: str = "") -> str:
    """One line saying code was left out here, as a comment of ``language``."""
    prefix = comment_prefix(language)
    return f"{indent}{prefix} ...\n" if prefix else f"{indent}...\n"


# ---------------------------------------------------------------------- chunking
def chunk_code(units: list[str], language: str) -> list[Chunk]:
    """Function/class-level chunks tiling ``units`` (see the module docstring)."""
    if not units:
        return []
    chunks: list[Chunk] | None = None
    if language == "python":
        chunks = _python_ast_chunks(units)
        if chunks is None:
            chunks = _python_line_chunks(units)
    elif language in _BRACE_LANGS:
        chunks = _brace_chunks(units, language)
    else:
        chunks = _paragraph_chunks(units)
    _check_tiling(chunks, len(units))
    for i, c in enumerate(chunks):
        if c.parent is not None:
            chunks[c.parent].children.append(i)
    return chunks


def _check_tiling(chunks: list[Chunk], n: int) -> None:
    pos = 0
    for c in chunks:
        if c.start != pos or c.end <= c.start:
            raise AssertionError(f"chunks do not tile the text at unit {pos}: {c}")
        pos = c.end
    if pos != n:
        raise AssertionError(f"chunks end at {pos}, text has {n} units")


def _python_ast_chunks(units: list[str]) -> list[Chunk] | None:
    text = "".join(units)
    if any(not u.endswith(("\n", "\r")) for u in units[:-1]):
        return None  # lines were cut into pieces: ast line numbers no longer map to units
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    n = len(units)
    chunks: list[Chunk] = []

    def stmt_start(node: ast.stmt) -> int:
        start = node.lineno - 1
        for d in getattr(node, "decorator_list", []) or []:
            start = min(start, d.lineno - 1)
        return start

    def header_end(node: ast.stmt) -> int:
        body = getattr(node, "body", None)
        if body:
            first = body[0].lineno - 1
            if first > node.lineno - 1:
                return first
        return (node.end_lineno or node.lineno)

    def walk(body: list[ast.stmt], lo: int, hi: int, parent: int | None) -> None:
        """Tile units [lo, hi) with chunks for the statements in ``body``."""
        pos = lo
        group_start: int | None = None  # pending run of plain statements

        def flush_group(upto: int) -> None:
            nonlocal group_start, pos
            if group_start is not None and upto > group_start:
                chunks.append(Chunk(group_start, upto, "module", parent=parent))
                pos = upto
            group_start = None

        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                s = _leading_comments(units, stmt_start(node), pos)
                if group_start is not None:
                    flush_group(s)  # the run of plain statements ends where the def starts
                s = pos  # blank lines/comments before a def belong to it
                e = min(node.end_lineno or node.lineno, hi)
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    for b in node.body
                ):
                    # header = class line(s) + everything before the first nested def
                    first_def = next(
                        b for b in node.body
                        if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    )
                    h_end = _leading_comments(units, stmt_start(first_def), header_end(node))
                    h_end = max(h_end, header_end(node))
                    idx = len(chunks)
                    chunks.append(
                        Chunk(s, h_end, "class", node.name, header_end(node), parent=parent)
                    )
                    inner = [b for b in node.body if stmt_start(b) >= h_end]
                    walk(inner, h_end, e, idx)  # tiles [h_end, e)
                else:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    chunks.append(Chunk(s, e, kind, node.name, header_end(node), parent=parent))
                pos = e
            else:
                if group_start is None:
                    group_start = pos
        if group_start is not None:
            flush_group(hi)
        if pos < hi:  # trailing blank lines / comments
            if chunks and chunks[-1].end == pos and pos > lo:
                chunks[-1].end = hi
            else:
                chunks.append(Chunk(pos, hi, "module", parent=parent))

    walk(tree.body, 0, n, None)
    return chunks


def _leading_comments(units: list[str], start: int, floor: int) -> int:
    """Move ``start`` up over directly preceding comment lines (not past ``floor``)."""
    s = start
    while s - 1 >= floor and units[s - 1].lstrip().startswith("#"):
        s -= 1
    return s


_PY_DEF = re.compile(r"^(\s*)(async\s+def|def|class)\s+(\w+)")


def _python_line_chunks(units: list[str]) -> list[Chunk]:
    """Python that does not parse: a new chunk at every ``def``/``class`` line (with its
    decorators and comments just above), as the reference implementation's regex does."""
    starts = [0]
    for i, u in enumerate(units):
        if _PY_DEF.match(u):
            s = i
            while s - 1 > starts[-1] and units[s - 1].lstrip().startswith(("@", "#")):
                s -= 1
            if s > starts[-1]:
                starts.append(s)
    starts.append(len(units))
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        m = next((_PY_DEF.match(units[j]) for j in range(a, b) if _PY_DEF.match(units[j])), None)
        h = next((j + 1 for j in range(a, b) if _PY_DEF.match(units[j])), a)
        out.append(
            Chunk(a, b, "function" if m else "module", m.group(3) if m else None, header_end=h)
        )
    return out


def _brace_depths(units: list[str], language: str) -> list[tuple[int, int, int]]:
    """For each unit: (depth at start, depth at end, max depth inside), skipping strings and
    comments (``//``, ``/* */``, ``#`` line comments for PHP)."""
    out = []
    depth = 0
    in_block = False
    quote: str | None = None
    for u in units:
        d0 = depth
        dmax = depth
        i = 0
        n = len(u)
        while i < n:
            ch = u[i]
            if in_block:
                if ch == "*" and i + 1 < n and u[i + 1] == "/":
                    in_block = False
                    i += 2
                    continue
                i += 1
                continue
            if quote is not None:
                if ch == "\\":
                    i += 2
                    continue
                if ch == quote:
                    quote = None
                elif ch == "\n" and quote != "`":
                    quote = None  # unterminated string: do not swallow the file
                i += 1
                continue
            if ch == "/" and i + 1 < n and u[i + 1] == "/":
                break
            if ch == "#" and language == "php":
                break
            if ch == "/" and i + 1 < n and u[i + 1] == "*":
                in_block = True
                i += 2
                continue
            if ch in "\"`" or (ch == "'" and language not in ("rust",)):
                quote = ch
            elif ch == "{":
                depth += 1
                dmax = max(dmax, depth)
            elif ch == "}":
                depth = max(0, depth - 1)
            i += 1
        if quote is not None and quote != "`" and u.endswith("\n"):
            quote = None
        out.append((d0, depth, dmax))
    return out


def _brace_chunks(units: list[str], language: str, member_split_units: int = 60) -> list[Chunk]:
    """Top-level items of a brace language: an item ends where the depth is back at 0 on a line
    ending in ``}`` or ``;`` (or a blank line at depth 0); items that opened a brace are
    function/class chunks, the others merge into module chunks. A brace item longer than
    ``member_split_units`` lines is split further at depth-1 boundaries (class members)."""
    depths = _brace_depths(units, language)
    items = _brace_items(units, depths, 0, len(units), 0)
    chunks: list[Chunk] = []
    pending: int | None = None  # start of a run of non-brace items
    for a, b, braced in items:
        if not braced:
            if pending is None:
                pending = a
            continue
        start = a if pending is None else pending
        if pending is not None and not _is_decl_prefix(units[pending:a]):
            chunks.append(Chunk(pending, a, "module"))
            start = a
        pending = None
        h = next((j + 1 for j in range(start, b) if depths[j][2] > 0), start)
        if b - start > member_split_units:
            members = _brace_items(units, depths, h, b, 1)
            if len(members) > 1:
                idx = len(chunks)
                # header: up to the first member that opens a brace
                first = next((m for m in members if m[2]), None)
                h_end = first[0] if first else h
                h_end = max(h_end, h)
                chunks.append(Chunk(start, h_end, "class", _brace_name(units[start:h]), h))
                pos = h_end
                for ma, mb, _ in members:
                    if mb <= pos:
                        continue
                    ma = max(ma, pos)
                    chunks.append(Chunk(ma, mb, "function", _brace_name(units[ma:mb]),
                                        _first_open(depths, ma, mb, 1), parent=idx))
                    pos = mb
                if pos < b:
                    chunks.append(Chunk(pos, b, "module", parent=idx))
                continue
        chunks.append(Chunk(start, b, "function", _brace_name(units[start:b]), h))
    if pending is not None:
        if chunks and chunks[-1].kind != "module":
            chunks.append(Chunk(pending, len(units), "module"))
        elif chunks:
            chunks[-1].end = len(units)
        else:
            chunks.append(Chunk(pending, len(units), "module"))
    return _merge_tiny(chunks)


def _first_open(depths: list[tuple[int, int, int]], a: int, b: int, base: int) -> int:
    return next((j + 1 for j in range(a, b) if depths[j][2] > base), a)


def _is_decl_prefix(lines: list[str]) -> bool:
    """Comments/annotations/blank lines directly before a definition stay with it."""
    return all(
        not s or s.startswith(("//", "/*", "*", "@", "#[", "[", "*/")) for s in (x.strip() for x in lines)
    )


def _brace_items(
    units: list[str], depths: list[tuple[int, int, int]], lo: int, hi: int, base: int
) -> list[tuple[int, int, bool]]:
    items = []
    a = lo
    braced = False
    for j in range(lo, hi):
        d0, d1, dmax = depths[j]
        if dmax > base:
            braced = True
        s = units[j].strip()
        end_here = d1 <= base and (
            s.endswith(("}", "};", ";", "})", "});")) or (not s and not braced)
        )
        if end_here and j + 1 > a:
            items.append((a, j + 1, braced))
            a = j + 1
            braced = False
    if a < hi:
        items.append((a, hi, braced))
    return items


_NAME_RE = re.compile(r"\b(?:func|function|fn|class|struct|interface|enum|impl|trait|def)\s+(\w+)|(\w+)\s*\(")


def _brace_name(lines: list[str]) -> str | None:
    for line in lines:
        m = _NAME_RE.search(line)
        if m:
            return m.group(1) or m.group(2)
    return None


def _merge_tiny(chunks: list[Chunk]) -> list[Chunk]:
    """Merge consecutive module chunks."""
    out: list[Chunk] = []
    remap: dict[int, int] = {}
    for i, c in enumerate(chunks):
        if out and c.kind == "module" and out[-1].kind == "module" and c.parent == out[-1].parent:
            out[-1].end = c.end
            remap[i] = len(out) - 1
            continue
        if c.parent is not None:
            c.parent = remap[c.parent]
        remap[i] = len(out)
        out.append(c)
    return out


def _paragraph_chunks(units: list[str], min_chars: int = 200) -> list[Chunk]:
    """Unknown language: paragraphs separated by blank lines, merged to at least ``min_chars``."""
    chunks: list[Chunk] = []
    a = 0
    size = 0
    for j, u in enumerate(units):
        size += len(u)
        if not u.strip() and size >= min_chars and j + 1 < len(units):
            chunks.append(Chunk(a, j + 1, "text"))
            a, size = j + 1, 0
    if a < len(units):
        if chunks and size < min_chars // 2:
            chunks[-1].end = len(units)
        else:
            chunks.append(Chunk(a, len(units), "text"))
    return chunks


def split_oversized(
    chunks: list[Chunk], unit_tokens: list[int], max_tokens: int, safe: list[bool]
) -> list[Chunk]:
    """Cut chunks longer than ``max_tokens`` into pieces (at safe unit boundaries, preferring
    blank lines); the pieces after the first get the first as parent, so a kept later piece still
    shows the signature. Parent indices are remapped."""
    out: list[Chunk] = []
    remap: dict[int, int] = {}
    for i, c in enumerate(chunks):
        size = sum(unit_tokens[c.start : c.end])
        remap[i] = len(out)
        parent = remap.get(c.parent) if c.parent is not None else None
        if size <= max_tokens or c.end - c.start < 2:
            out.append(Chunk(c.start, c.end, c.kind, c.name, c.header_end, parent))
            continue
        first_idx = len(out)
        a = c.start
        acc = 0
        best = None
        j = c.start
        pieces = []
        while j < c.end:
            acc += unit_tokens[j]
            if j + 1 < c.end and safe[j] and j + 1 >= c.header_end:
                best = j + 1
            if acc >= max_tokens and best is not None and best > a:
                pieces.append((a, best))
                a = best
                acc = sum(unit_tokens[a : j + 1])
                best = None
            j += 1
        pieces.append((a, c.end))
        for k, (pa, pb) in enumerate(pieces):
            if k == 0:
                out.append(Chunk(pa, pb, c.kind, c.name, min(c.header_end, pb), parent))
            else:
                out.append(Chunk(pa, pb, "piece", c.name, pa, first_idx))
    for c in out:
        c.children = []
    for i, c in enumerate(out):
        if c.parent is not None:
            out[c.parent].children.append(i)
    return out


# ---------------------------------------------------------------------- safe boundaries
def safe_split_points(units: list[str], language: str) -> list[bool]:
    """``safe[i]`` is True when a block may end after unit ``i``: for Python, the end of a logical
    line (not inside brackets, a multi-line string or a backslash continuation); elsewhere every
    unit that ends a line. The last unit is always safe."""
    n = len(units)
    safe = [u.endswith(("\n", "\r")) for u in units]
    if n:
        safe[-1] = True
    if language != "python" or any(not u.endswith(("\n", "\r")) for u in units[:-1]):
        return safe
    ends = [False] * n
    try:
        depth = 0
        for tok in tokenize.generate_tokens(io.StringIO("".join(units)).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth = max(0, depth - 1)
            elif tok.type == tokenize.NEWLINE or (tok.type == tokenize.NL and depth == 0):
                r = tok.start[0] - 1
                if 0 <= r < n:
                    ends[r] = True
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return safe
    for i in range(n):
        if not units[i].strip():
            ends[i] = True
    ends[-1] = True
    return ends
