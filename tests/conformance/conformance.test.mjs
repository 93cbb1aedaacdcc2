// Runs the official Durable Streams server conformance suite (332 tests)
// against the server at CONFORMANCE_BASE_URL.
//
// The package's own CLI finds no tests when installed from the registry
// (vitest excludes node_modules), so we import the suite into our own file.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_BASE_URL
if (!baseUrl) {
  throw new Error("CONFORMANCE_BASE_URL is required, e.g. http://127.0.0.1:4437")
}

runConformanceTests({
  baseUrl,
  // Must be >= the server's long-poll timeout (DS_LONG_POLL_TIMEOUT_MS);
  // long-poll tests get this plus 1 s as their vitest timeout.
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS ?? 3000),
  // The 6 reserved-subscription tests are opt-in (describe.runIf) and stay
  // off until the gateway implements subscriptions; they report as skipped.
  subscriptions: false,
})
