#!/bin/sh
# Drift check: regenerate the TypeScript stubs from ../../protos into a temporary directory with the
# pinned local protoc-gen-es and compare them with the checked-in src/gen. Exit 1 on any difference
# (fix with `npm run generate` in clients/typescript), 2 if the tools are missing.
set -eu
cd "$(dirname "$0")/.."

if [ ! -x node_modules/.bin/buf ] || [ ! -x node_modules/.bin/protoc-gen-es ]; then
	echo "check-generated: node_modules missing; run 'npm ci' in clients/typescript" >&2
	exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# --output re-roots the plugin's `out: src/gen` under the temporary directory.
node_modules/.bin/buf generate --output "$tmp"

if diff -r -u src/gen "$tmp/src/gen"; then
	echo "check-generated: clients/typescript/src/gen is up to date with protos/"
else
	echo "check-generated: clients/typescript/src/gen is stale; run 'npm run generate' in clients/typescript" >&2
	exit 1
fi
