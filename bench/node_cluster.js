'use strict';
// Node.js cluster peer for the handoff RPC benchmark.
//
//   node bench/node_cluster.js PORT WORKERS
//
// The primary forks WORKERS workers (round-robin scheduling: the primary
// accepts and hands connections to workers); each worker serves the RPC
// protocol on 127.0.0.1:PORT:
//   frame   = u32 little-endian length + JSON body
//   ping    {"in":"ping","params":X} -> {"out":"pong","result":X}
//   whoami  {"in":"whoami"}          -> {"out":"whoami","result":{"worker":I,"pid":N}}
//   work    {"in":"work","params":{"us":N}} -> {"out":"work","result":N} after
//           busy-looping the CPU for N microseconds (an integer, 0..1000000)
//   other   -> {"out":"error","result":"<reason>"} (connection stays open)
//   a frame longer than 1 MiB destroys the connection.
// The primary prints "ready" once every worker listens, and on SIGTERM/SIGINT
// kills the workers and exits.

const cluster = require('node:cluster');
const net = require('node:net');

const MAX_FRAME = 1024 * 1024;
const MAX_WORK_US = 1000000;

const port = Number(process.argv[2]);
const workers = Number(process.argv[3] || 1);
if (!Number.isInteger(port) || port < 1 || port > 65535 ||
    !Number.isInteger(workers) || workers < 1) {
  console.error('usage: node node_cluster.js PORT WORKERS');
  process.exit(2);
}

cluster.schedulingPolicy = cluster.SCHED_RR; // must be set before fork()

if (cluster.isPrimary) {
  let listening = 0;
  const stopping = require('./node_stop.js')(cluster);

  for (let i = 0; i < workers; i++) {
    cluster.fork({ HANDOFF_WORKER_INDEX: String(i) });
  }

  cluster.on('listening', () => {
    listening += 1;
    if (listening === workers) console.log('ready');
  });

  cluster.on('exit', (worker, code, signal) => {
    if (!stopping()) {
      console.error(`worker pid ${worker.process.pid} died (${signal || code})`);
    }
    if (Object.keys(cluster.workers).length === 0 && stopping()) process.exit(0);
  });

} else {
  const index = Number(process.env.HANDOFF_WORKER_INDEX);

  function handle(body) {
    let msg;
    try {
      msg = JSON.parse(body.toString('utf8'));
    } catch (e) {
      return { out: 'error', result: `bad json: ${e.message}` };
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      return { out: 'error', result: 'request must be a JSON object' };
    }
    switch (msg.in) {
      case 'ping':
        if (!Object.prototype.hasOwnProperty.call(msg, 'params')) {
          return { out: 'error', result: 'missing params' };
        }
        return { out: 'pong', result: msg.params };
      case 'whoami':
        return { out: 'whoami', result: { worker: index, pid: process.pid } };
      case 'work': {
        const p = msg.params;
        const us = p !== null && typeof p === 'object' ? p.us : undefined;
        if (!Number.isInteger(us) || us < 0 || us > MAX_WORK_US) {
          return { out: 'error', result: `work: params must be {"us":N}, N an integer from 0 to ${MAX_WORK_US}` };
        }
        // Busy, not asleep: the event loop serves nothing else meanwhile.
        const end = process.hrtime.bigint() + BigInt(us) * 1000n;
        while (process.hrtime.bigint() < end);
        return { out: 'work', result: us };
      }
      default:
        return { out: 'error', result: `unknown method: ${JSON.stringify(msg.in)}` };
    }
  }

  function frame(obj) {
    const body = Buffer.from(JSON.stringify(obj), 'utf8');
    const out = Buffer.allocUnsafe(4 + body.length);
    out.writeUInt32LE(body.length, 0);
    body.copy(out, 4);
    return out;
  }

  const server = net.createServer({ noDelay: true }, (socket) => {
    let buf = Buffer.alloc(0);
    socket.on('data', (chunk) => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      // Answer every complete frame, in order; keep the partial tail.
      while (buf.length >= 4) {
        const len = buf.readUInt32LE(0);
        if (len > MAX_FRAME) {
          socket.destroy();
          return;
        }
        if (buf.length < 4 + len) break;
        const body = buf.subarray(4, 4 + len);
        buf = buf.subarray(4 + len);
        socket.write(frame(handle(body)));
      }
    });
    socket.on('error', () => {}); // ECONNRESET etc.: just drop the connection
  });
  server.on('error', (e) => {
    console.error(`worker ${index}: ${e.message}`);
    process.exit(1);
  });
  server.listen(port, '127.0.0.1');
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => {}); // the primary decides when we stop
}
