// The primary's stop, shared by the Node bench peers: on SIGTERM or
// SIGINT, TERM every worker, exit once none is left (the caller's 'exit'
// handler calls process.exit when `stopping()` and no worker remains), and
// KILL whatever still runs after 2 s.
'use strict';

module.exports = function installStop(cluster) {
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    const alive = Object.values(cluster.workers);
    if (alive.length === 0) process.exit(0);
    for (const w of alive) w.process.kill('SIGTERM');
    // Do not hang around if a worker ignores SIGTERM.
    setTimeout(() => {
      for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
      process.exit(0);
    }, 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  return () => stopping;
};
