#!/usr/bin/env bash
# Type-check the whole package as `tlsgate.*`. The folders workers/, supervisor/, bpf/ and
# loadtest/ are installed as tlsgate.workers, ... by an import hook that mypy cannot follow,
# so this builds the package as mypy should see it — a tree of links in .typecheck/ — and
# checks it there as our own code (not as an installed library whose errors mypy would hide).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tree="$here/.typecheck"
rm -rf "$tree"
mkdir -p "$tree/tlsgate"
for f in "$here"/tlsgate/*; do ln -s "$f" "$tree/tlsgate/"; done
for d in workers supervisor bpf loadtest; do ln -s "$here/$d" "$tree/tlsgate/$d"; done
ln -s "$here/tests" "$tree/tests"
cd "$tree"
exec "$here/.venv/bin/mypy" --config-file "$here/pyproject.toml" -p tlsgate -p tests "$@"
