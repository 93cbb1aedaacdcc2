// Vitest config for running the official Durable Streams conformance suite
// against an already-running server (URL in CONFORMANCE_BASE_URL).
import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    // One test file; run files one after another in a single fork so the
    // report order is stable. The suite's own `test.concurrent` blocks still
    // run concurrently inside that file (bounded by maxConcurrency).
    fileParallelism: false,
    pool: "forks",
    maxConcurrency: 5,
    // Long-poll tests set their own timeout (longPollTimeoutMs + 1 s); this is
    // the ceiling for everything else (fuzzing, TTL expiry waits, SSE).
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // A real server: a failing test must not be hidden by retries.
    retry: 0,
    // Readable output on the console plus a machine-readable report that
    // tests/e2e/test_conformance.py parses. The output file can be overridden
    // with --outputFile.json=... on the command line.
    reporters: ["default", "json"],
    outputFile: { json: process.env.CONFORMANCE_REPORT ?? "report.json" },
  },
})
