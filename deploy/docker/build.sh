#!/usr/bin/env bash
# Builds the Switchyard image from a binary built outside it:
#   deploy/docker/build.sh [BINARY] [TAG]
# BINARY defaults to target/release/switchyard (cargo build --release -p switchyard), TAG to
# switchyard:VERSION. The image holds the binary (debug info stripped), the shared libraries
# it links (from this machine, as `ldd` lists them), the embedded code model and an empty
# /data and /pki owned by the image's user (65532), for volumes.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
binary="${1:-$root/target/release/switchyard}"
version="$("$binary" --version | awk '{print $2}')"
tag="${2:-switchyard:$version}"
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/usr/local/bin" "$context/rootfs/data" "$context/rootfs/pki" "$context/rootfs/models" "$context/rootfs/tmp"
strip -o "$context/rootfs/usr/local/bin/switchyard" "$binary" 2>/dev/null || cp "$binary" "$context/rootfs/usr/local/bin/switchyard"
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
done
cp -r "$root/models/switchyard-code-moe" "$context/rootfs/models/"
cp "$root/deploy/docker/Containerfile" "$context/Containerfile"
docker build -q -f "$context/Containerfile" -t "$tag" "$context" >/dev/null
echo "$tag"
