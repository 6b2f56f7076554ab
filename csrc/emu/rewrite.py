"""Mechanical rewrite of CUDA C++ sources (csrc/*.cu, *.cuh) into host C++ for the CPU emulator.

Three rewrites, nothing else (see cuda_emu.h for what the result runs against):

* ``k<<<grid, block[, smem[, stream]]>>>(args)`` becomes
  ``::dlconv_emu::launch("k", k, ::dlconv_emu::config(grid, block[, smem[, stream]]), args)``;
* ``__shared__ [__align__(n)] T name[D1][D2];`` becomes
  ``auto& name = ::dlconv_emu::block_shared<T[D1][D2]>("file:line:name", n);`` and
  ``extern __shared__ T name[];`` becomes ``T* name = ::dlconv_emu::dynamic_shared<T>();``;
* ``__syncthreads()`` becomes ``::dlconv_emu::syncthreads("function#k")``: the k-th barrier of that
  function in source order, the name DLCONV_EMU_DROP_SYNC selects to drop one (the negative control).

``#include "x.cu"`` / ``"x.cuh"`` keep their names: the rewritten files are written side by side, so an
include resolves to the rewritten copy.  The output starts with a ``#line`` directive and keeps every
line where it was, so compiler and sanitizer reports name the original file and line.  A construct the
rewrite does not understand (two declarators in one __shared__ line, an unbalanced launch) is an error,
never passed through.

    python csrc/emu/rewrite.py SRC OUT [--append EXTRA]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "catch", "do", "else"}
_FUNC_HEAD = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_SHARED = re.compile(r"(?P<extern>\bextern\s+)?\b__shared__\s+(?P<rest>[^;]*);")
_ALIGN = re.compile(r"__align__\s*\(\s*([^)]*?)\s*\)")
_DECL = re.compile(r"^(?P<type>.*?[\w*&>\s])\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", re.S)


class RewriteError(ValueError):
    pass


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _match_close(text: str, pos: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at text[pos]; brackets of the other kinds must balance."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    i = pos
    while i < len(text):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                raise RewriteError(f"unbalanced {c!r} at line {_line_of(text, i)}")
            if not stack:
                return i
        i += 1
    raise RewriteError(f"no closing {close_ch!r} for the {open_ch!r} at line {_line_of(text, pos)}")


def _split_top(text: str) -> list[str]:
    """Split at commas outside (), [] and {}."""
    out, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return out


def _blank_comments_and_strings(text: str) -> str:
    """Same length, comments and string literals replaced by spaces (newlines kept)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif text[i] in "\"'":
            q, j = text[i], i + 1
            while j < n and text[j] != q:
                j += 2 if text[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _function_at(code: str, pos: int) -> str:
    """Name of the function whose body contains pos (code has comments blanked)."""
    depth, i = 0, pos
    while i > 0:
        i -= 1
        c = code[i]
        if c == "}":
            depth += 1
        elif c == "{":
            if depth == 0:
                # the `{` opening the innermost block around pos: is it a function body?
                head = code[max(0, i - 4000):i]
                close = head.rstrip()
                if close.endswith(")"):
                    # walk back to the matching "(" and take the name before it
                    j, d = len(close) - 1, 0
                    while j >= 0:
                        if close[j] == ")":
                            d += 1
                        elif close[j] == "(":
                            d -= 1
                            if d == 0:
                                break
                        j -= 1
                    m = re.search(r"([A-Za-z_]\w*)\s*$", close[:j])
                    if m and m.group(1) not in _KEYWORDS:
                        return m.group(1)
            else:
                depth -= 1
    raise RewriteError(f"__syncthreads() outside any function at line {_line_of(code, pos)}")


def _rewrite_launches(text: str, code: str) -> tuple[str, str]:
    out, cout, last = [], [], 0
    for m in re.finditer(r"<<<", code):
        start = m.start()
        if start < last:
            continue
        # callee: an identifier path, optionally with template arguments, just before <<<
        j = start
        while j > 0 and code[j - 1].isspace():
            j -= 1
        end_callee = j
        if code[j - 1] == ">":
            d = 0
            while j > 0:
                j -= 1
                if code[j] == ">":
                    d += 1
                elif code[j] == "<":
                    d -= 1
                    if d == 0:
                        break
        while j > 0 and (code[j - 1].isalnum() or code[j - 1] in "_:"):
            j -= 1
        callee = text[j:end_callee]
        if not re.match(r"[A-Za-z_:]", callee):
            raise RewriteError(f"cannot read the kernel name before <<< at line {_line_of(text, start)}")
        cfg_end = code.find(">>>", start + 3)
        if cfg_end < 0:
            raise RewriteError(f"<<< without >>> at line {_line_of(text, start)}")
        cfg = text[start + 3:cfg_end]
        k = cfg_end + 3
        while k < len(code) and code[k].isspace():
            k += 1
        if k >= len(code) or code[k] != "(":
            raise RewriteError(f"launch of {callee} without an argument list at line {_line_of(text, start)}")
        close = _match_close(code, k, "(", ")")
        args = text[k + 1:close]
        ncfg = len(_split_top(cfg))
        if not 2 <= ncfg <= 4:
            raise RewriteError(f"launch of {callee}: {ncfg} configuration values at line {_line_of(text, start)}")
        name = re.sub(r"\s+", "", callee)
        repl = (f'::dlconv_emu::launch("{name}", {callee}, ::dlconv_emu::config({cfg})'
                + (f", {args})" if args.strip() else ")"))
        # keep every newline of the original span so that line numbers stay put
        lost = text[j:close + 1].count("\n") - repl.count("\n")
        repl += "\n" * max(0, lost)
        out.append(text[last:j] + repl)
        cout.append(code[last:j] + repl)
        last = close + 1
    out.append(text[last:])
    cout.append(code[last:])
    return "".join(out), "".join(cout)


def _rewrite_shared(text: str, code: str, fname: str) -> tuple[str, str]:
    pieces, last = [], 0
    for m in _SHARED.finditer(code):
        rest = text[m.start("rest"):m.end("rest")]
        if "," in _blank_comments_and_strings(rest).split("[")[0] or re.search(r"\]\s*,", rest):
            raise RewriteError(f"{fname}:{_line_of(text, m.start())}: one declarator per __shared__ line, please")
        align = "0"
        am = _ALIGN.search(rest)
        if am:
            align = am.group(1)
            rest = _ALIGN.sub(" ", rest)
        d = _DECL.match(rest.strip())
        if not d:
            raise RewriteError(f"{fname}:{_line_of(text, m.start())}: cannot parse __shared__ {rest!r}")
        typ, name, dims = d.group("type").strip(), d.group("name"), re.sub(r"\]\s+\[", "][", d.group("dims").strip())
        line = _line_of(text, m.start())
        if m.group("extern"):
            if dims != "[]":
                raise RewriteError(f"{fname}:{line}: extern __shared__ {name} must be declared {name}[]")
            repl = f"{typ}* {name} = ::dlconv_emu::dynamic_shared<{typ}>();"
        else:
            if "[]" in dims:
                raise RewriteError(f"{fname}:{line}: __shared__ {name}{dims} needs sizes (or extern)")
            repl = (f'auto& {name} = ::dlconv_emu::block_shared<{typ}{dims}>('
                    f'"{fname}:{line}:{name}", {align});')
        pieces.append(text[last:m.start()] + repl + "\n" * text[m.start():m.end()].count("\n"))
        last = m.end()
    pieces.append(text[last:])
    new = "".join(pieces)
    return new, _blank_comments_and_strings(new)


def _rewrite_syncs(text: str, code: str) -> str:
    counts: dict[str, int] = {}
    pieces, last = [], 0
    for m in re.finditer(r"\b__syncthreads\s*\(\s*\)", code):
        fn = _function_at(code, m.start())
        counts[fn] = counts.get(fn, 0) + 1
        pieces.append(text[last:m.start()] + f'::dlconv_emu::syncthreads("{fn}#{counts[fn]}")')
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces)


def rewrite(text: str, fname: str) -> str:
    """The host-C++ form of one CUDA source `text` (named fname in reports)."""
    code = _blank_comments_and_strings(text)
    text, code = _rewrite_launches(text, code)
    text, code = _rewrite_shared(text, code, os.path.basename(fname))
    text = _rewrite_syncs(text, code)
    return text


def rewrite_file(src: str, out: str, append: str | None = None) -> None:
    with open(src, encoding="utf-8") as f:
        text = f.read()
    body = f'#line 1 "{os.path.abspath(src)}"\n' + rewrite(text, src)
    n_in, n_out = text.count("\n"), body.count("\n") - 1
    if n_in != n_out:
        raise RewriteError(f"{src}: rewrite changed the line count ({n_in} -> {n_out})")
    if append:
        with open(append, encoding="utf-8") as f:
            extra = f.read()
        body += f'\n#line 1 "{os.path.abspath(append)}"\n' + rewrite(extra, append)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--append", help="a CUDA source rewritten and appended to the same translation unit")
    a = ap.parse_args(argv)
    try:
        rewrite_file(a.src, a.out, a.append)
    except RewriteError as e:
        print(f"rewrite.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
