#!/usr/bin/env bash
# Re-vendors uPlot (the status page's charts) from the npm registry: the minified browser
# build, its stylesheet and its license, into this directory. Run by hand when upgrading;
# the build never downloads anything (the files are embedded with include_str!).
#   bash src/status/assets/vendor-uplot.sh 1.6.32
set -euo pipefail
version="${1:?usage: vendor-uplot.sh VERSION}"
here="$(cd "$(dirname "$0")" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && npm pack --silent "uplot@$version" >/dev/null && tar xzf "uplot-$version.tgz")
cp "$scratch/package/dist/uPlot.iife.min.js" "$here/uPlot.iife.min.js"
cp "$scratch/package/dist/uPlot.min.css" "$here/uPlot.min.css"
cp "$scratch/package/LICENSE" "$here/uPlot.LICENSE"
sha256sum "$here/uPlot.iife.min.js" "$here/uPlot.min.css"
echo "now update the version and checksums in $here/README.md"
