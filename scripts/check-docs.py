#!/usr/bin/env python3
"""Every public (or open) declaration in Sources/ has a `///` comment: lists those that do not
and exits 1. Run by scripts/test.sh."""
import os
import re
import sys

DECLARATION = re.compile(r"(@\w+(\(.*?\))?\s+)*(public|open)\s")
missing = []
for root, _, files in os.walk(os.path.join(os.path.dirname(__file__), "..", "Sources")):
    for name in files:
        if not name.endswith(".swift"):
            continue
        path = os.path.normpath(os.path.join(root, name))
        lines = open(path, encoding="utf-8").read().split("\n")
        for number, line in enumerate(lines):
            text = line.strip()
            if not DECLARATION.match(text) or text.startswith("public import"):
                continue
            above = number - 1
            while above >= 0 and lines[above].strip().startswith("@"):
                above -= 1
            if above >= 0 and lines[above].strip().startswith("///"):
                continue
            missing.append(f"{path}:{number + 1}: {text[:100]}")
for entry in missing:
    print(entry)
if missing:
    print(f"{len(missing)} public declarations without a /// comment", file=sys.stderr)
    sys.exit(1)
print("every public declaration is documented")
