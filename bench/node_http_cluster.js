'use strict';
// Node.js http + cluster peer for the HTTP benchmark (make bench-http).
//
//   node bench/node_http_cluster.js PORT WORKERS
//
// The primary forks WORKERS workers (round-robin scheduling: the primary
// accepts and hands connections to workers); each worker runs node:http on
// 127.0.0.1:PORT and answers every request with 200 text/plain "hello\n"
// (HEAD: the headers alone). Keep-alive is Node's default; a request with
// `Connection: close` gets its answer and the connection closes.
// The primary prints "ready port=PORT workers=N" once every worker listens.
//
// SIGHUP: a rolling restart, the way cluster users do one (as pm2 reload
// does): for each worker in turn, fork a replacement, wait until it
// listens, then retire the old one: tell it to drain (from then on its
// answers carry `Connection: close`, so a keep-alive client reconnects, to
// the new worker, after its next answer) and call worker.disconnect() (the
// old worker's server stops taking connections; Node's http server.close()
// also closes the keep-alive connections that are idle at that moment; the
// worker exits once its last connection has closed). A worker still alive
// KILL_AFTER_MS (5000) later is killed. When every worker has been replaced
// the primary prints "reloaded N" (N counts the restarts). A SIGHUP that
// comes while one is running is queued.
// SIGTERM/SIGINT: the primary kills the workers and exits.

const cluster = require('node:cluster');
const http = require('node:http');

const KILL_AFTER_MS = 5000;

const port = Number(process.argv[2]);
const workers = Number(process.argv[3] || 1);
if (!Number.isInteger(port) || port < 1 || port > 65535 ||
    !Number.isInteger(workers) || workers < 1) {
  console.error('usage: node node_http_cluster.js PORT WORKERS');
  process.exit(2);
}

cluster.schedulingPolicy = cluster.SCHED_RR; // must be set before fork()

if (cluster.isPrimary) {
  const stopping = require('./node_stop.js')(cluster);
  let rolling = false;
  let queued = 0;
  let reloads = 0;
  const retiring = new Set();

  // fork(): a new worker, resolved once it listens.
  const fork = () => new Promise((resolve, reject) => {
    const w = cluster.fork();
    const onExit = (code, signal) => reject(new Error(`new worker died (${signal || code})`));
    w.once('exit', onExit);
    w.once('listening', () => { w.removeListener('exit', onExit); resolve(w); });
  });

  // retire(w): drain and disconnect w; resolved once it has exited.
  const retire = (w) => new Promise((resolve) => {
    retiring.add(w);
    w.retired = true;
    const timer = setTimeout(() => {
      console.error(`worker pid ${w.process.pid} still alive ${KILL_AFTER_MS} ms after disconnect: killed`);
      w.process.kill('SIGKILL');
    }, KILL_AFTER_MS);
    w.once('exit', () => { clearTimeout(timer); retiring.delete(w); resolve(); });
    w.send('drain');
    w.disconnect();
  });

  const roll = async () => {
    if (rolling) { queued += 1; return; }
    rolling = true;
    try {
      for (const old of Object.values(cluster.workers)) {
        if (stopping() || retiring.has(old)) continue;
        await fork();
        await retire(old);
      }
      reloads += 1;
      console.log(`reloaded ${reloads}`);
    } catch (e) {
      console.error(`rolling restart failed: ${e.message}`);
    }
    rolling = false;
    if (queued > 0 && !stopping()) { queued -= 1; roll(); }
  };

  Promise.all(Array.from({ length: workers }, fork)).then(
    () => console.log(`ready port=${port} workers=${workers}`),
    (e) => { console.error(e.message); process.exit(1); });

  cluster.on('exit', (w, code, signal) => {
    if (!stopping() && !w.retired) {
      console.error(`worker pid ${w.process.pid} died (${signal || code})`);
    }
    if (stopping() && Object.keys(cluster.workers).length === 0) process.exit(0);
  });

  process.on('SIGHUP', roll);
} else {
  const BODY = Buffer.from('hello\n');
  let draining = false;

  const server = http.createServer((req, res) => {
    const headers = { 'Content-Type': 'text/plain', 'Content-Length': BODY.length };
    if (draining) headers.Connection = 'close';
    res.writeHead(200, headers);
    res.end(req.method === 'HEAD' ? undefined : BODY);
  });
  server.on('error', (e) => {
    console.error(`worker ${process.pid}: ${e.message}`);
    process.exit(1);
  });
  server.listen(port, '127.0.0.1');
  process.on('message', (m) => { if (m === 'drain') draining = true; });
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => {}); // the primary decides when we stop
}
