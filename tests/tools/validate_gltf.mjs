// Validate one glTF/GLB file with the Khronos glTF-Validator (npm package gltf-validator) and
// print its JSON report on stdout. Usage: node validate_gltf.mjs FILE.glb
// The package is looked up under .ci/node (where .ci/run installs it) or GLTF_VALIDATOR_DIR.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const prefix = process.env.GLTF_VALIDATOR_DIR || path.join(here, "..", "..", ".ci", "node");
const require = createRequire(path.join(prefix, "node_modules", "noop.js"));
const validator = require("gltf-validator");

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate_gltf.mjs FILE.glb");
  process.exit(2);
}
const bytes = new Uint8Array(await readFile(file));
const report = await validator.validateBytes(bytes, {
  uri: path.basename(file),
  maxIssues: 0, // report every issue
  // External files are resolved beside the asset (a .glb embeds everything, so this is rarely used).
  externalResourceFunction: (uri) =>
    readFile(path.join(path.dirname(file), decodeURIComponent(uri))).then((b) => new Uint8Array(b)),
});
process.stdout.write(JSON.stringify(report, null, 2) + "\n");
