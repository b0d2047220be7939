// Drives the unmodified `e2b` npm SDK (2.51.0) against `wrenn up`.
//
// Configured only through the SDK's own environment variables (set by
// tests/e2b_cp/test_js_sdk.py, or by hand):
//   E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL   (E2B_DOMAIN: optional)
// Run:  cd tests/e2b_cp/js && npm ci && npm test
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { CommandExitError, FileType, Sandbox, SandboxNotFoundError } from 'e2b'

for (const v of ['E2B_API_KEY', 'E2B_API_URL', 'E2B_SANDBOX_URL']) {
  if (!process.env[v]) throw new Error(`${v} is not set (see tests/e2b_cp/README.md)`)
}
delete process.env.E2B_DEBUG

const tag = `js-${Math.random().toString(16).slice(2, 14)}`
const made = []

async function create(opts = {}) {
  const sbx = await Sandbox.create({ timeoutMs: 300_000, ...opts, metadata: { tag, ...(opts.metadata ?? {}) } })
  made.push(sbx.sandboxId)
  return sbx
}

after(async () => {
  for (const id of made) {
    try { await Sandbox.kill(id) } catch { /* already gone */ }
  }
})

// GET through the server with a Host header ({port}-{id}.{domain}): node's
// fetch does not let a caller set Host, node:http does.
function getByHost(host, path = '/') {
  const base = new URL(process.env.E2B_API_URL)
  return new Promise((resolve, reject) => {
    const req = http.get({ host: base.hostname, port: base.port, path, headers: { host } }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode, body }))
    })
    req.on('error', reject)
  })
}

test('create, info, list with metadata, kill', async () => {
  const sbx = await create({ metadata: { which: 'a b/c' } })
  assert.match(sbx.sandboxId, /^cl-[0-9a-z]{25}$/)
  assert.equal(await sbx.isRunning(), true)
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.state, 'running')
  assert.deepEqual(info.metadata, { tag, which: 'a b/c' })

  const page = await Sandbox.list({ query: { metadata: { tag, which: 'a b/c' } } }).nextItems()
  assert.deepEqual(page.map((s) => s.sandboxId), [sbx.sandboxId])

  assert.equal(await sbx.kill(), true)
  assert.equal(await sbx.isRunning(), false) // /health: 502 "... was not found"
  assert.equal(await Sandbox.kill(sbx.sandboxId), false) // body.code === 404
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), SandboxNotFoundError)
  await assert.rejects(Sandbox.connect(sbx.sandboxId), SandboxNotFoundError)
})

test('commands: foreground, background, connect, kill, stdin', async () => {
  const sbx = await create()
  const r = await sbx.commands.run('echo out; echo err >&2; whoami')
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'out\nuser\n')
  assert.equal(r.stderr, 'err\n')

  await assert.rejects(sbx.commands.run('exit 7'), (e) => e instanceof CommandExitError && e.exitCode === 7)

  const chunks = []
  await sbx.commands.run('for i in 1 2 3; do echo $i; sleep 0.1; done', { onStdout: (d) => chunks.push(d) })
  assert.equal(chunks.join(''), '1\n2\n3\n')

  const bg = await sbx.commands.run('sleep 600', { background: true, timeoutMs: 0 })
  assert.ok(bg.pid > 0)
  const listed = await sbx.commands.list()
  assert.ok(listed.some((p) => p.pid === bg.pid))
  await bg.disconnect()
  const again = await sbx.commands.connect(bg.pid, { timeoutMs: 0 })
  assert.equal(await sbx.commands.kill(bg.pid), true)
  await assert.rejects(again.wait(), CommandExitError)
  assert.equal(await sbx.commands.kill(bg.pid), false)

  const cat = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(cat.pid, 'from js\n')
  await sbx.commands.closeStdin(cat.pid)
  assert.equal((await cat.wait()).stdout, 'from js\n')
})

test('pty', async () => {
  const sbx = await create()
  let out = ''
  const dec = new TextDecoder()
  const pty = await sbx.pty.create({ cols: 80, rows: 24, timeoutMs: 30_000, onData: (d) => { out += dec.decode(d) } })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('echo pty-$((6*7)); exit\n'))
  const r = await pty.wait()
  assert.equal(r.exitCode, 0)
  assert.ok(out.includes('pty-42'), out)
})

test('files: write, read, list, exists, makeDir, remove, watch, signed URLs', async () => {
  const sbx = await create()
  const w = await sbx.files.write('/tmp/js/a.txt', 'hello js')
  assert.equal(w.path, '/tmp/js/a.txt')
  assert.equal(await sbx.files.read('/tmp/js/a.txt'), 'hello js')
  const bytes = new Uint8Array(256 * 1024).map((_, i) => i % 256)
  await sbx.files.write('/tmp/js/b.bin', bytes.buffer)
  assert.deepEqual(await sbx.files.read('/tmp/js/b.bin', { format: 'bytes' }), bytes)
  const entries = await sbx.files.list('/tmp/js')
  assert.deepEqual(entries.map((e) => [e.name, e.type]).sort(), [['a.txt', FileType.FILE], ['b.bin', FileType.FILE]])
  assert.equal(await sbx.files.exists('/tmp/js/a.txt'), true)
  assert.equal(await sbx.files.makeDir('/tmp/js/d'), true)
  assert.equal(await sbx.files.makeDir('/tmp/js/d'), false)
  await sbx.files.remove('/tmp/js/d')
  assert.equal(await sbx.files.exists('/tmp/js/d'), false)
  assert.equal((await sbx.files.write('rel.txt', 'r')).path, '/home/user/rel.txt')

  const events = []
  const watcher = await sbx.files.watchDir('/tmp/js', (e) => { events.push(e) }, { timeoutMs: 0 })
  await sbx.files.write('/tmp/js/new.txt', 'n')
  for (let i = 0; i < 100 && !events.some((e) => e.name === 'new.txt'); i++) await new Promise((r) => setTimeout(r, 100))
  await watcher.stop()
  assert.ok(events.some((e) => e.name === 'new.txt' && e.type === 'create'), JSON.stringify(events))

  // signed URLs (path in the query with '+' for spaces, URLSearchParams style)
  await sbx.files.write('/tmp/js/dl me.txt', 'signed')
  const routing = { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49983' }
  const dl = await sbx.downloadUrl('/tmp/js/dl me.txt')
  assert.ok(dl.includes('signature=v1_'), dl)
  let res = await fetch(dl, { headers: routing })
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'signed')
  const form = new FormData()
  form.append('file', new Blob(['uploaded']), 'up.txt')
  res = await fetch(await sbx.uploadUrl('/tmp/js/up.txt'), { method: 'POST', body: form, headers: routing })
  assert.equal(res.status, 200, await res.clone().text())
  assert.equal(await sbx.files.read('/tmp/js/up.txt'), 'uploaded')
})

test('getHost and a server in the sandbox', async () => {
  const sbx = await create()
  const host = sbx.getHost(8080)
  assert.equal(host, `8080-${sbx.sandboxId}.${sbx.sandboxDomain}`)
  await sbx.files.write('/tmp/www/index.html', 'from js sandbox')
  await sbx.commands.run('python3 -m http.server 8080 --directory /tmp/www', { background: true, timeoutMs: 0 })
  let r
  for (let i = 0; i < 60; i++) {
    r = await getByHost(host, '/index.html')
    if (r.status === 200) break
    await new Promise((res) => setTimeout(res, 500))
  }
  assert.equal(r.status, 200)
  assert.equal(r.body, 'from js sandbox')
  const viaHeaders = await fetch(`${process.env.E2B_SANDBOX_URL}/index.html`, {
    headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '8080' },
  })
  assert.equal(await viaHeaders.text(), 'from js sandbox')
})

test('setTimeout, pause, connect', async () => {
  const sbx = await create()
  await sbx.setTimeout(600_000)
  const end = (await sbx.getInfo()).endAt.getTime()
  assert.ok(Math.abs(end - Date.now() - 600_000) < 15_000, String(end - Date.now()))
  await sbx.files.write('/tmp/p.txt', 'kept')
  assert.equal(await sbx.pause(), true)
  assert.equal(await sbx.pause(), false) // body.code === 409
  assert.equal(await sbx.isRunning(), false)
  assert.equal((await sbx.getInfo()).state, 'paused')
  const back = await Sandbox.connect(sbx.sandboxId)
  assert.equal(await back.isRunning(), true)
  assert.equal(await back.files.read('/tmp/p.txt'), 'kept')
})
