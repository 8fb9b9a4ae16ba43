// Builds the panel bundle into ../tb_stability/plugin/static/ with fixed,
// unhashed file names (index.js, style.css). Deterministic: same sources and
// lock file give byte-identical output (checked by `make frontend-check`).
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.resolve(here, "../tb_stability/plugin/static");

await esbuild.build({
  absWorkingDir: here,
  entryPoints: { index: "src/index.ts", style: "src/style.css" },
  outdir,
  bundle: true,
  format: "esm",
  target: ["es2020"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
});
console.log(`built ${outdir}/index.js and style.css`);
