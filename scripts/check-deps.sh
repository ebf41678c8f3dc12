#!/usr/bin/env bash
# Says plainly what is missing for a build, instead of a CMake error.
set -u
for pc in libpcre2-8 libxxhash; do
    if ! pkg-config --exists "$pc" 2>/dev/null; then
        echo "tandem: the build needs $pc (and pkg-config); run 'make deps' first" >&2
        exit 1
    fi
done
command -v cmake >/dev/null || { echo "tandem: cmake is missing; run 'make deps' first" >&2; exit 1; }
exit 0
