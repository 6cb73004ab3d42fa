#!/usr/bin/env bash
# Builds the DocC documentation of every library product with warnings as errors: a broken
# symbol link, a parameter left out of a `- Parameters:` list or an ambiguous link fails.
# Uses the debug build's modules (run `swift build` first; scripts/test.sh does) and the
# toolchain's `swift symbolgraph-extract` and `docc`; writes nothing into the tree.
#
#   scripts/check-docc.sh                 every library
#   scripts/check-docc.sh ASGI Channels   some of them
set -euo pipefail
cd "$(dirname "$0")/.."
MODULES=("$@")
[ ${#MODULES[@]} -gt 0 ] || MODULES=(ASGI RedisChannelLayer InterfaceServer Channels ChannelsRedis ChannelsCommand ChannelsTesting)
BIN="$(swift build --show-bin-path)"
[ -d "$BIN/Modules" ] || { echo "no debug build at $BIN: run swift build first" >&2; exit 2; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The C modules the Swift modules import: SwiftPM's generated module maps, the packages' own.
INCLUDES=(-I "$BIN/Modules" -Xcc -I/usr/include/hiredis)
while IFS= read -r map; do INCLUDES+=(-Xcc "-fmodule-map-file=$map"); done < <(find "$BIN" -maxdepth 2 -name module.modulemap)
while IFS= read -r dir; do INCLUDES+=(-I "$dir"); done < <(find .build/checkouts Sources -name module.modulemap -not -path "*/Benchmarks/*" -exec dirname {} \; | sort -u)
failed=()
for module in "${MODULES[@]}"; do
  mkdir -p "$OUT/$module-symbols"
  swift symbolgraph-extract -module-name "$module" "${INCLUDES[@]}" -target "$(uname -m)-unknown-linux-gnu" \
    -minimum-access-level public -output-dir "$OUT/$module-symbols" >"$OUT/$module-extract.log" 2>&1 || {
    cat "$OUT/$module-extract.log" >&2; failed+=("$module (symbol graph)"); continue; }
  catalog=()
  [ -d "Sources/$module/$module.docc" ] && catalog=("Sources/$module/$module.docc")
  if docc convert "${catalog[@]}" --additional-symbol-graph-dir "$OUT/$module-symbols" \
      --fallback-display-name "$module" --fallback-bundle-identifier "org.swift-channels.$module" \
      --output-path "$OUT/$module.doccarchive" --warnings-as-errors >"$OUT/$module-docc.log" 2>&1; then
    echo "  $module: documentation built, no warnings"
  else
    grep -E "(error|warning):|-->" "$OUT/$module-docc.log" | head -40 >&2
    failed+=("$module")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "DocC found problems in: ${failed[*]}" >&2
  exit 1
fi
