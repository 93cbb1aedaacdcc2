// Exactly-once, in-order delivery through the official TypeScript client.
//
//   node idempotent-producer.mjs BASE_URL COUNT [MAX_BATCH_BYTES] [STREAM_PATH]
//
// Creates a JSON stream at BASE_URL/v1/stream/STREAM_PATH, writes COUNT messages
// {"i": k} (k = 0 .. COUNT-1) through one IdempotentProducer (default maxInFlight
// 5, so up to 5 batches are in flight at once; small batches so that there are
// many of them), flushes, reads the whole stream back and prints one JSON line:
//
//   {written, read, inOrder, duplicates, missing, errors, posts, statuses,
//    instances, writeMs, readMs}
//
// `statuses` counts the producer's HTTP responses by status (409s are the
// server reporting a sequence gap the client then waits out), `instances` by
// the X-DS-Instance header (which replica answered). Exit code 0 when the run
// finished (whatever the counts; the caller judges them), 2 on a usage error,
// 1 on an exception or when the run exceeded its deadline.
import { DurableStream, IdempotentProducer } from "@durable-streams/client"

const [baseUrl, countArg, batchArg, pathArg] = process.argv.slice(2)
const count = Number(countArg)
if (!baseUrl || !Number.isInteger(count) || count < 1) {
  console.error("usage: node idempotent-producer.mjs BASE_URL COUNT [MAX_BATCH_BYTES] [PATH]")
  process.exit(2)
}
const maxBatchBytes = Number(batchArg ?? 256)
const path = pathArg ?? `idempotent-producer-${Date.now()}-${process.pid}`
const url = `${baseUrl.replace(/\/$/, "")}/v1/stream/${path}`

// Never hang: the caller has its own timeout, this one reports where we were.
const deadlineMs = Number(process.env.IDEMPOTENT_PRODUCER_DEADLINE_MS ?? 50_000)
let phase = "start"
setTimeout(() => {
  console.error(`idempotent-producer: deadline of ${deadlineMs} ms exceeded in phase ${phase}`)
  process.exit(1)
}, deadlineMs).unref()

const statuses = {}
const instances = {}
let posts = 0
const countingFetch = async (input, init) => {
  const response = await fetch(input, init)
  posts += 1
  statuses[response.status] = (statuses[response.status] ?? 0) + 1
  const instance = response.headers.get("x-ds-instance") ?? "none"
  instances[instance] = (instances[instance] ?? 0) + 1
  return response
}

const errors = []
phase = "create"
const stream = await DurableStream.create({ url, contentType: "application/json" })

phase = "write"
const writeStarted = performance.now()
const producer = new IdempotentProducer(stream, `producer-${process.pid}`, {
  maxBatchBytes,
  fetch: countingFetch,
  onError: (error) => errors.push(String(error?.stack ?? error)),
})
for (let k = 0; k < count; k++) {
  producer.append(JSON.stringify({ i: k }))
  // Yield now and then so batches go out while we keep appending (pipelining).
  if (k % 50 === 49) await new Promise((resolve) => setImmediate(resolve))
}
await producer.flush()
await producer.detach()
const writeMs = Math.round(performance.now() - writeStarted)

phase = "read"
const readStarted = performance.now()
const response = await stream.stream({ offset: "-1", live: false })
const items = await response.json()
const readMs = Math.round(performance.now() - readStarted)

const seen = new Map()
let inOrder = true
let previous = -1
for (const item of items) {
  const k = item?.i
  seen.set(k, (seen.get(k) ?? 0) + 1)
  if (!(Number.isInteger(k) && k > previous)) inOrder = false
  previous = Number.isInteger(k) ? k : previous
}
let duplicates = 0
for (const n of seen.values()) duplicates += n - 1
let missing = 0
for (let k = 0; k < count; k++) if (!seen.has(k)) missing += 1

console.log(
  JSON.stringify({
    url,
    written: count,
    read: items.length,
    inOrder,
    duplicates,
    missing,
    errors,
    posts,
    statuses,
    instances,
    maxBatchBytes,
    writeMs,
    readMs,
  }),
)
process.exit(0)
