// Launches the Node reference server (@durable-streams/server) for bench/.
//   PORT=4438 [HOST=127.0.0.1] [DATA_DIR=/tmp/x] node bench/node/server.mjs
// In memory without DATA_DIR, file-backed with it. Prints one line
// "listening <url>" when ready; SIGTERM/SIGINT stop it gracefully.
import { DurableStreamTestServer } from '@durable-streams/server'

const server = new DurableStreamTestServer({
  port: Number(process.env.PORT),
  host: process.env.HOST || '127.0.0.1',
  ...(process.env.DATA_DIR ? { dataDir: process.env.DATA_DIR } : {}),
})
const url = await server.start()
process.stdout.write(`listening ${url}\n`)

let stopping = false
async function stop() {
  if (stopping) return
  stopping = true
  const timer = setTimeout(() => process.exit(0), 5000)
  timer.unref()
  try {
    await server.stop()
  } finally {
    process.exit(0)
  }
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
