#!/bin/sh
# cargo-stubs [Cargo.toml]: writes a stub source file for every target the
# manifest declares, so that docker/Dockerfile can build the dependencies in
# a layer of their own before it copies the real sources.
#
# Cargo refuses a manifest whose declared targets have no source file, even
# when building only `--bin pingress`: every [[bin]], [[bench]], [[test]] and
# [[example]] gets `fn main() {}` at its `path`, or at the default path for
# its `name` (src/bin/, benches/, tests/, examples/). src/main.rs and
# src/lib.rs are always written. Existing files are left alone.
set -eu
manifest=${1:-Cargo.toml}

stub() {
    [ -e "$1" ] && return 0
    mkdir -p "$(dirname "$1")"
    printf '%s\n' "$2" > "$1"
}

stub src/main.rs 'fn main() {}'
stub src/lib.rs ''

awk '
function flush() {
    if (kind != "" && (path != "" || name != ""))
        print (path != "" ? path : dir[kind] "/" name ".rs")
    kind = ""; name = ""; path = ""
}
function value(line) {
    sub(/^[^"]*"/, "", line); sub(/".*$/, "", line); return line
}
BEGIN { dir["bin"] = "src/bin"; dir["bench"] = "benches"; dir["test"] = "tests"; dir["example"] = "examples" }
/^[ \t]*\[\[(bin|bench|test|example)\]\]/ {
    flush(); kind = $0; sub(/^[ \t]*\[\[/, "", kind); sub(/\]\].*$/, "", kind); next
}
/^[ \t]*\[/ { flush(); next }
kind != "" && /^[ \t]*name[ \t]*=/ { name = value($0) }
kind != "" && /^[ \t]*path[ \t]*=/ { path = value($0) }
END { flush() }
' "$manifest" | while read -r file; do
    stub "$file" 'fn main() {}'
done
