// Bundles the page into dist/: index.html, app.css and app.js (one ES module, no inline code, so the
// union's Content-Security-Policy can allow scripts and styles from its own origin only).
//
// The protobuf stubs are clients/typescript's (one `buf generate` for both clients); their
// @bufbuild/protobuf imports are pointed at this package's copy, so the bundle holds one runtime.

import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");

/** Resolves every @bufbuild/protobuf import (and subpath) from this directory, wherever it is written. */
const oneProtobufRuntime = {
  name: "one-protobuf-runtime",
  setup(build) {
    build.onResolve({ filter: /^@bufbuild\/protobuf(\/.*)?$/ }, async (args) => {
      if (args.pluginData === "from-web") return undefined;
      return await build.resolve(args.path, { kind: args.kind, resolveDir: here, pluginData: "from-web" });
    });
  },
};

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.ts")],
  outfile: join(dist, "app.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  plugins: [oneProtobufRuntime],
  logLevel: "warning",
});
await copyFile(join(here, "index.html"), join(dist, "index.html"));
await copyFile(join(here, "app.css"), join(dist, "app.css"));
await copyFile(join(here, "favicon.svg"), join(dist, "favicon.svg"));
