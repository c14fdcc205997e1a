#!/usr/bin/env python3
"""Writes the README's benchmark table from the figure lines of `bench all` (issue 15).

    target/release/bench all --out target/bench/figures.txt
    python3 scripts/bench-table.py target/bench/figures.txt            # print the table
    python3 scripts/bench-table.py target/bench/figures.txt --readme README.md   # replace it there

Reads the `bench=machine ...` line and every `bench=SCENARIO figure=NAME ...` line (the shape
`tests/src/bin/bench/main.rs` prints with `figure`); other `bench=` lines are the scenarios' own
detail and are left out. With --readme, the text between `<!-- bench-table:start -->` and
`<!-- bench-table:end -->` is replaced; a README without the markers is an error, never edited
elsewhere. Exits non-zero if the file holds no figure line.
"""

import argparse
import shlex
import sys

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"


def parse(line):
    """`key=value key="quoted value"` into a dict (shell-like quoting)."""
    fields = {}
    for token in shlex.split(line):
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text or "—"
    if value != value:  # NaN
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(lines):
    machine = None
    rows = []
    for line in lines:
        line = line.strip()
        if not line.startswith("bench="):
            continue
        fields = parse(line)
        if fields.get("bench") == "machine":
            machine = fields
        elif "figure" in fields:
            rows.append(fields)
    if not rows:
        raise SystemExit("bench-table: no `figure=` line in the input (run `bench all` first)")
    where = "unknown machine"
    if machine:
        where = (
            f"{machine.get('cores', '?')} cores, {machine.get('cpu', '?')}, "
            f"{machine.get('mem_gib', '?')} GiB, load {machine.get('load1', '?')} at the start"
        )
    out = [
        f"Machine: {where}.",
        "",
        "| scenario | figure | baseline (same run) | tokenfleet | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = r.get("unit", "")
        out.append(
            "| {scenario} | {figure} ({unit}) | {baseline}: {bv} | {value} | {ratio}× | {target} | {met} |".format(
                scenario=r.get("bench", "?"),
                figure=r.get("figure", "?"),
                unit=unit,
                baseline=r.get("baseline", "?"),
                bv=number(r.get("baseline_value")),
                value=number(r.get("value")),
                ratio=number(r.get("ratio")),
                target=r.get("target", "?"),
                met={"true": "**yes**", "stated": "stated"}.get(r.get("met"), "no"),
            )
        )
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("figures", help="the file `bench all --out` wrote")
    ap.add_argument("--readme", help="README to update between the bench-table markers")
    args = ap.parse_args()
    with open(args.figures, encoding="utf-8") as f:
        text = table(f)
    if not args.readme:
        sys.stdout.write(text)
        return
    with open(args.readme, encoding="utf-8") as f:
        readme = f.read()
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"bench-table: {args.readme} has no {START} ... {END} section")
    updated = readme[: start + len(START)] + "\n" + text + readme[end:]
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(updated)
    print(f"bench-table: {len(text.splitlines()) - 4} figures written to {args.readme}")


if __name__ == "__main__":
    main()
