#!/usr/bin/env python3
"""Import circles inside each crate of the workspace.

Per crate (every directory with a Cargo.toml and a `src/lib.rs` or `src/main.rs`), builds the
graph of its source files: file A depends on file B when A names a path into B's module
(`use crate::x::y`, `crate::x::f()`, `super::f`, `self::child::f`, or `child::f` for a module A
declares). Prints every strongly connected component (a set of files that import each other in a
circle) larger than the limit, and exits 1 if there is one.

Usage: scripts/import-cycles.py [--max N] [--crate DIR]... [--all] [ROOT]
  --max N     largest circle allowed (default 3 files)
  --crate DIR only this crate (repeatable); default: every crate below ROOT (default: repo root)
  --all       also list the circles within the limit

Why not a library: cargo-modules and similar need a nightly toolchain or a full rust-analyzer
load (minutes on 2 cores); Rust paths are regular enough that reading them as text is exact for
this code base, which names modules by path, not by glob re-exports. `#[cfg(test)] mod` blocks
are left out (test code may look back at its parent without making a circle in the product).
"""

import argparse
import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_source(text):
    """Removes comments, string/char literals and `#[cfg(test)] mod … { … }` blocks."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            i = n if j < 0 else j + len(end)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or (c == "'" and text.startswith("'\\", i)):
            j = text.find("'", i + 2)
            i = n if j < 0 else j + 1
            out.append("' '")
        else:
            out.append(c)
            i += 1
    code = "".join(out)
    # Test modules: `#[cfg(test)]` followed by `mod name {` … matching `}`.
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+" + IDENT + r"\s*\{", code)
        if not m:
            break
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        code = code[: m.start()] + code[j:]
    return code


def use_paths(tree, prefix=""):
    """Expands a `use` tree (`a::{b, c::{d, e}}`) into full paths."""
    tree = tree.strip()
    brace = tree.find("{")
    if brace < 0:
        path = (prefix + tree).split(" as ")[0].strip()
        return [path] if path else []
    head = tree[:brace]
    body = tree[brace + 1: tree.rfind("}")]
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:k])
            start = k + 1
    parts.append(body[start:])
    paths = []
    for part in parts:
        if part.strip() == "self":
            paths.append((prefix + head).rstrip(":"))
        elif part.strip():
            paths.extend(use_paths(part, prefix + head))
    return paths


class Crate:
    def __init__(self, root):
        self.root = root
        self.src = os.path.join(root, "src")
        self.modules = {}  # module path tuple -> file
        lib = os.path.join(self.src, "lib.rs")
        entry = lib if os.path.exists(lib) else os.path.join(self.src, "main.rs")
        self._load(entry, ())

    def _load(self, path, module):
        self.modules[module] = path
        with open(path, encoding="utf-8") as f:
            code = strip_source(f.read())
        base = os.path.dirname(path)
        if os.path.basename(path) not in ("lib.rs", "main.rs", "mod.rs"):
            base = os.path.join(base, os.path.basename(path)[:-3])
        for m in re.finditer(r"(?:#\[path\s*=\s*\"[^\"]*\"\]\s*)?(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", code):
            name = m.group(1)
            for candidate in (os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")):
                if os.path.exists(candidate):
                    self._load(candidate, module + (name,))
                    break

    def children(self, module):
        return {m[-1] for m in self.modules if len(m) == len(module) + 1 and m[: len(module)] == module}

    def resolve(self, module, segments):
        """The file a path names, or None (external crates, items of the same file)."""
        if not segments:
            return None
        if segments[0] == "crate":
            target, rest = (), segments[1:]
        elif segments[0] in ("super", "self"):
            target, rest = module, segments
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    target = target[:-1]
                rest = rest[1:]
        elif segments[0] in self.children(module):
            target, rest = module, segments
        else:
            return None
        for seg in rest:
            if target + (seg,) in self.modules:
                target = target + (seg,)
            else:
                break
        return self.modules[target]

    def graph(self):
        edges = {f: set() for f in self.modules.values()}
        for module, path in self.modules.items():
            with open(path, encoding="utf-8") as f:
                code = strip_source(f.read())
            paths = []
            for m in re.finditer(r"\buse\s+([^;]+);", code):
                paths.extend(use_paths(m.group(1)))
            children = self.children(module)
            heads = ["crate", "super", "self"] + sorted(children)
            head_re = r"(?<![A-Za-z0-9_:])(?:" + "|".join(map(re.escape, heads)) + r")(?:\s*::\s*" + IDENT + r")+"
            paths.extend(m.group(0) for m in re.finditer(head_re, code))
            for p in paths:
                segments = [s.strip() for s in p.split("::") if s.strip()]
                target = self.resolve(module, segments)
                if target and target != path:
                    edges[path].add(target)
        return edges


def strongly_connected(edges):
    """Tarjan's algorithm, iterative."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
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
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    advanced = True
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == node:
                        break
                out.append(sorted(component))
    return out


def find_crates(root):
    crates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("target", ".git", "node_modules") and not d.startswith(".")]
        if "Cargo.toml" in filenames and (
            os.path.exists(os.path.join(dirpath, "src", "lib.rs")) or os.path.exists(os.path.join(dirpath, "src", "main.rs"))
        ):
            crates.append(dirpath)
    return sorted(crates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=3)
    parser.add_argument("--crate", action="append", default=[])
    parser.add_argument("--all", action="store_true")
    parser.add_argument("root", nargs="?", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    crates = args.crate or find_crates(args.root)
    failed = False
    for root in crates:
        crate = Crate(root)
        rel = os.path.relpath(root, args.root)
        circles = [c for c in strongly_connected(crate.graph()) if len(c) > 1]
        largest = max((len(c) for c in circles), default=1)
        print(f"{rel}: {len(crate.modules)} files, largest circle {largest if circles else 0} files")
        for c in sorted(circles, key=len, reverse=True):
            if len(c) > args.max or args.all:
                mark = "TOO LARGE" if len(c) > args.max else "ok"
                print(f"  circle of {len(c)} ({mark}): " + ", ".join(os.path.relpath(f, crate.src) for f in c))
            failed |= len(c) > args.max
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
