// Builds the Gradients tab into tb_gradient_plugin/static/ (or --outdir DIR). The output is byte-for-byte
// reproducible from package-lock.json and src/, which the test suite checks against the committed bundle.

import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const at = args.indexOf("--outdir");
const outdir = resolve(at >= 0 ? args[at + 1] : join(here, "..", "tb_gradient_plugin", "static"));

mkdirSync(outdir, { recursive: true });
for (const name of readdirSync(outdir)) {
  if (name.endsWith(".js") || name.endsWith(".txt")) rmSync(join(outdir, name));
}

await esbuild.build({
  absWorkingDir: here,
  entryPoints: ["src/index.js"],
  outfile: join(outdir, "index.js"),
  bundle: true,
  format: "esm",
  target: ["es2020"],
  platform: "browser",
  minify: true,
  sourcemap: false,
  charset: "utf8",
  legalComments: "linked",
  loader: { ".css": "text" },
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
