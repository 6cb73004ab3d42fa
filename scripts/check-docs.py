#!/usr/bin/env python3
"""Every public (or open) declaration in Sources/ has a `///` comment, and the README's
Hummingbird snippet is Examples/Announce's code (which scripts/check-hummingbird.sh builds and
runs): lists what is not so and exits 1. Run by scripts/test.sh."""
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
root = os.path.join(os.path.dirname(__file__), "..")
source = open(os.path.join(root, "Examples/Announce/Sources/Announce/main.swift"), encoding="utf-8").read()
block = source.split("// README begin\n")[1].split("// README end\n")[0]
snippets = [s for s in re.findall(r"```swift\n(.*?)```", open(os.path.join(root, "README.md"), encoding="utf-8").read(), re.S)
            if "Hummingbird" in s]
stripped = lambda text: [line.strip() for line in text.strip().splitlines()]
if not snippets or stripped(snippets[0]) != stripped(block):
    missing.append("README.md: the Hummingbird snippet is not Examples/Announce/Sources/Announce/main.swift's README block")
for entry in missing:
    print(entry)
if missing:
    print(f"{len(missing)} problems", file=sys.stderr)
    sys.exit(1)
print("every public declaration is documented; the README's Hummingbird snippet is Examples/Announce's code")
