#!/usr/bin/env python3
"""Fold `perf script` output and draw a flame graph as a self-contained SVG.

    perf record -F 1999 -a --call-graph dwarf -o perf.data -- sleep 2
    perf script -i perf.data | scripts/flamegraph.py --title "null QD32" > out.svg

Options: --comm NAME (repeatable) keeps only those threads; --folded FILE also writes the
folded stacks ("comm;outer;...;inner count", the format of Brendan Gregg's
stackcollapse-perf.pl), so they can be diffed or fed to other tools. No dependency beyond
Python 3.
"""

import argparse
import html
import re
import sys
from collections import defaultdict

SIMPLIFY = [
    (re.compile(r"\+0x[0-9a-f]+$"), ""),
    (re.compile(r"<(.*) as (.*)>::"), r"<\1 as \2>::"),
]


def clean(sym):
    for r, s in SIMPLIFY:
        sym = r.sub(s, sym)
    # Inlined-frame markers and closure noise make graphs wide without saying much.
    sym = sym.replace(" (inlined)", "")
    return sym


SKIP = re.compile(
    r"catch_unwind|AssertUnwindSafe|FnOnce|__rust_begin_short_backtrace|spawn_unchecked|"
    r"thread_start|call_once|guarded|^clone3$|^start_thread$|WorkerPool::new::\{\{closure\}\}"
)


def fold(lines, comms):
    stacks = defaultdict(int)
    comm = None
    frames = []

    def flush():
        if comm is not None and (not comms or comm in comms):
            fr = [f for f in reversed(frames) if not SKIP.search(f)]
            stacks[";".join([comm] + fr)] += 1

    for line in lines:
        line = line.rstrip("\n")
        if not line:
            flush()
            comm, frames = None, []
            continue
        if not line[0].isspace():
            comm = line.split()[0]
            frames = []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        sym = parts[1]
        sym = re.sub(r"\s+\([^()]*\)$", "", sym)  # drop " (dso)"
        if sym == "[unknown]":
            continue
        frames.append(clean(sym))
    flush()
    return stacks


def color(name):
    h = 0
    for c in name:
        h = (h * 31 + ord(c)) & 0xFFFFFFFF
    if "[k]" in name or name.startswith(("_raw", "__x64", "do_", "ksys", "vfs_", "eventfd")):
        return "rgb(%d,%d,%d)" % (200 + h % 40, 120 + h % 60, 60)
    return "rgb(%d,%d,%d)" % (220 + h % 30, 80 + (h >> 8) % 120, 40 + (h >> 16) % 40)


def render(stacks, title, width=1200, row=16):
    root = {"n": 0, "c": {}}
    for st, n in stacks.items():
        node = root
        node["n"] += n
        for f in st.split(";"):
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += n
    total = max(root["n"], 1)
    depth = [0]

    def walk(node, d):
        depth[0] = max(depth[0], d)
        for ch in node["c"].values():
            walk(ch, d + 1)

    walk(root, 0)
    height = (depth[0] + 3) * row + 30
    out = [
        '<?xml version="1.0" standalone="no"?>',
        '<svg version="1.1" width="%d" height="%d" xmlns="http://www.w3.org/2000/svg" '
        'font-family="Verdana, sans-serif" font-size="11">' % (width, height),
        '<rect width="100%" height="100%" fill="#f8f8f8"/>',
        '<text x="%d" y="20" text-anchor="middle" font-size="15">%s (%d samples)</text>'
        % (width // 2, html.escape(title), total),
    ]
    scale = (width - 20) / total

    def draw(node, name, x, d):
        w = node["n"] * scale
        if w < 0.3:
            return
        y = height - (d + 1) * row - 10
        pct = 100.0 * node["n"] / total
        label = "%s (%.2f%%)" % (name, pct)
        out.append(
            '<g><title>%s</title><rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" '
            'rx="2"/>' % (html.escape(label), x, y, w, row - 1, color(name))
        )
        chars = int(w / 6.5)
        if chars >= 3:
            t = name if len(name) <= chars else name[: max(chars - 2, 1)] + ".."
            out.append('<text x="%.1f" y="%d">%s</text>' % (x + 3, y + row - 4, html.escape(t)))
        out.append("</g>")
        cx = x
        for cname, ch in sorted(node["c"].items()):
            draw(ch, cname, cx, d + 1)
            cx += ch["n"] * scale

    cx = 10.0
    for cname, ch in sorted(root["c"].items()):
        draw(ch, cname, cx, 0)
        cx += ch["n"] * scale
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--title", default="flame graph")
    ap.add_argument("--comm", action="append", default=[])
    ap.add_argument("--folded")
    a = ap.parse_args()
    stacks = fold(sys.stdin, set(a.comm))
    if a.folded:
        with open(a.folded, "w") as f:
            for k, v in sorted(stacks.items(), key=lambda kv: -kv[1]):
                f.write("%s %d\n" % (k, v))
    sys.stdout.write(render(stacks, a.title))


if __name__ == "__main__":
    main()
