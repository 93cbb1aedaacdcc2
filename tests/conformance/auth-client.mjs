// The official TypeScript client against a gateway with DS_AUTH=jwt.
//
//   node auth-client.mjs STREAM_URL TOKEN
//
// Creates a JSON stream at STREAM_URL with `Authorization: Bearer TOKEN` (the
// client's `headers` option), appends three messages, reads them back, then
// tries one read without the token. Prints one JSON line:
//
//   {items, withoutToken}
//
// where `withoutToken` is the error's HTTP status (or "ok" if the read worked).
// Exit code 0 when the run finished, 2 on a usage error, 1 on an exception.
import { DurableStream } from "@durable-streams/client"

const [url, token] = process.argv.slice(2)
if (!url || !token) {
  console.error("usage: node auth-client.mjs STREAM_URL TOKEN")
  process.exit(2)
}
setTimeout(() => {
  console.error("auth-client: deadline exceeded")
  process.exit(1)
}, 30_000).unref()

const headers = { Authorization: `Bearer ${token}` }
const stream = await DurableStream.create({ url, headers, contentType: "application/json" })
for (let k = 0; k < 3; k++) await stream.append(JSON.stringify({ k }))
const items = await (await stream.stream({ offset: "-1", live: false })).json()

let withoutToken = "ok"
try {
  const anonymous = new DurableStream({ url })
  await (await anonymous.stream({ offset: "-1", live: false })).json()
} catch (error) {
  withoutToken = error?.status ?? String(error)
}
console.log(JSON.stringify({ items, withoutToken }))
