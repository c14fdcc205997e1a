#!/usr/bin/env python3
"""Import circles inside each crate of the workspace.

Builds, per crate, the graph of its source files: an edge A -> B when A names a path into B
(`use crate::x::y`, `crate::x::y` inline, `super::`, `self::`, or a child module of A by its bare
name). Comments (including `//!` and `///` doc links) and `#[cfg(test)] mod tests`
blocks at the end of a file are ignored; a `mod x;` declaration is not an import. Prints every
strongly connected component of more than MAX files (default 3) and exits 1 when there is one.

    python3 scripts/import-cycles.py                 # every crate, circles > 3 files
    python3 scripts/import-cycles.py agent --max 1   # one crate, every circle of 2 or more
    python3 scripts/import-cycles.py --all           # also print each crate's largest circle

No third-party modules; runs anywhere Python 3.8+ is.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crates():
    """(name, src dir) of every crate with a src/lib.rs or src/main.rs under the workspace."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in ("target", ".git", "node_modules", ".tools", ".venv-test")
                       and not d.startswith(".")]
        if "Cargo.toml" in filenames and os.path.isdir(os.path.join(dirpath, "src")):
            src = os.path.join(dirpath, "src")
            for root_file in ("lib.rs", "main.rs"):
                if os.path.exists(os.path.join(src, root_file)):
                    out.append((os.path.relpath(dirpath, ROOT) or ".", src, root_file))
                    break
    return sorted(out)


def strip(text):
    """The code without comments, string literals' contents, and a trailing test module."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests\s*\{", text)
    if m:
        text = text[: m.start()]
    return text


def module_files(src, root_file):
    """{module path tuple: file} for the crate rooted at src/root_file (following `mod x;`)."""
    files = {}

    def visit(path, file, is_dir_owner):
        files[path] = file
        try:
            code = strip(open(file, encoding="utf-8").read())
        except OSError:
            return
        base = os.path.dirname(file) if is_dir_owner else os.path.splitext(file)[0]
        for m in re.finditer(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", code):
            name = m.group(1)
            flat = os.path.join(base, name + ".rs")
            nested = os.path.join(base, name, "mod.rs")
            if os.path.exists(flat):
                visit(path + (name,), flat, False)
            elif os.path.exists(nested):
                visit(path + (name,), nested, True)

    visit((), os.path.join(src, root_file), True)
    return files


PATH = r"[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*"


def edges(files):
    by_path = files
    graph = {f: set() for f in files.values()}
    for mod_path, file in files.items():
        code = strip(open(file, encoding="utf-8").read())
        children = {p[-1] for p in files if len(p) == len(mod_path) + 1 and p[:-1] == mod_path}
        refs = []
        for m in re.finditer(r"\b(crate|super|self)((?:::(?:super|[A-Za-z_][A-Za-z0-9_]*))+)", code):
            refs.append((m.group(1), [s for s in m.group(2).split("::") if s]))
        # A child module named bare in code: `reporter::DEFAULT_HEARTBEAT`.
        for child in children:
            for m in re.finditer(r"(?<![\w:])" + child + r"((?:::[A-Za-z_][A-Za-z0-9_]*)+)", code):
                refs.append(("self", [child] + [s for s in m.group(1).split("::") if s]))
        # `use` trees: `use crate::a::{b, c::d}` and bare child names `use devices::X`.
        for m in re.finditer(r"\buse\s+([^;]+);", code):
            tree = re.sub(r"\s+", "", m.group(1))
            for path in expand(tree):
                if path and path[0] in children:
                    refs.append(("self", path))
                elif path and path[0] in ("crate", "super", "self"):
                    refs.append((path[0], path[1:]))
        for anchor, segs in refs:
            if anchor == "crate":
                target = ()
            elif anchor == "self":
                target = mod_path
            else:
                target = mod_path[:-1]
            while segs and segs[0] == "super":
                target = target[:-1]
                segs = segs[1:]
            best = target
            for s in segs:
                if best + (s,) in by_path:
                    best = best + (s,)
                else:
                    break
            dest = by_path.get(best)
            if dest and dest != file:
                graph[file].add(dest)
    return graph


def expand(tree):
    """Paths of a `use` tree without whitespace: `a::{b,c::d}` -> [[a,b],[a,c,d]]."""
    depth, start = 0, None
    for i, c in enumerate(tree):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0 and start is not None:
                prefix = [s for s in tree[:start].split("::") if s]
                inner, parts, d, last = tree[start + 1 : i], [], 0, 0
                for j, ch in enumerate(inner):
                    if ch == "{":
                        d += 1
                    elif ch == "}":
                        d -= 1
                    elif ch == "," and d == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                out = []
                for p in parts:
                    if p:
                        out.extend(prefix + q for q in expand(p))
                    else:
                        out.append(prefix)
                return out
    path = re.sub(r"\bas\b.*$", "", tree)
    return [[s for s in path.split("::") if s and s != "*"]]


def sccs(graph):
    """Tarjan's strongly connected components (iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(sorted(comp))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("crates", nargs="*", help="crate directories (relative), default all")
    ap.add_argument("--max", type=int, default=3, help="largest allowed circle, in files")
    ap.add_argument("--all", action="store_true", help="print each crate's largest circle")
    args = ap.parse_args()
    bad = False
    for name, src, root_file in crates():
        if args.crates and not any(name == c or name.endswith("/" + c) for c in args.crates):
            continue
        files = module_files(src, root_file)
        comps = sorted(sccs(edges(files)), key=len, reverse=True)
        largest = len(comps[0]) if comps else 0
        over = [c for c in comps if len(c) > args.max]
        if over or args.all:
            print(f"{name}: {len(files)} files, largest import circle {largest} file(s)")
        for c in over:
            bad = True
            print(f"  circle of {len(c)}: " + ", ".join(os.path.relpath(f, src) for f in c))
    if not bad:
        print(f"no import circle larger than {args.max} files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
