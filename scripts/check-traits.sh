#!/usr/bin/env bash
# The package's Redis trait: an application built without it (`traits: []` on its dependency on
# swift-channels) gets the commands on the in-memory layer and links no hiredis.
#   1. With the default traits off, no target the commands depend on (transitively) is the
#      Redis layer, its session and delay stores, or the hiredis system library.
#   2. The commands compile that way (the `#if Redis` branches that say a redis:// URL needs
#      the trait), in the debug build directory (only ChannelsCommand is compiled again).
# scripts/test.sh runs it before the main build.
set -euo pipefail
cd "$(dirname "$0")/.."
swift package --disable-default-traits describe --type json | python3 -c '
import json, sys
targets = {t["name"]: t for t in json.load(sys.stdin)["targets"]}
seen, todo = set(), ["ChannelsCommand"]
while todo:
    name = todo.pop()
    if name in seen or name not in targets:
        continue
    seen.add(name)
    todo += targets[name].get("target_dependencies", [])
redis = sorted(seen & {"CHiredis", "RedisChannelLayer", "ChannelsRedis"})
if redis:
    sys.exit("without the Redis trait the commands still depend on: " + ", ".join(redis))
print("without the Redis trait the commands depend on: " + ", ".join(sorted(seen - {"ChannelsCommand"})) + " (no hiredis)")
'
swift build --disable-default-traits --target ChannelsCommand >/tmp/check-traits.$$ 2>&1 || { cat /tmp/check-traits.$$ >&2; rm -f /tmp/check-traits.$$; exit 1; }
rm -f /tmp/check-traits.$$
echo "the commands compile without the Redis trait"
