#!/usr/bin/env node
// The package bin, runnable by plain node. In the repository (the TypeScript
// sources are next to this file) it runs them through tsx, a dev dependency;
// in the installed package it runs the compiled JavaScript in dist/.
import { existsSync } from "node:fs";

const sources = new URL("./main.ts", import.meta.url);
let cli;
if (existsSync(sources)) {
  const { register } = await import("tsx/esm/api");
  register();
  cli = await import(sources.href);
} else {
  cli = await import(new URL("../../dist/src/cli/main.js", import.meta.url).href);
}
await cli.runCli(process.argv.slice(2));
