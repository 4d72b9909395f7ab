/*
 * handoff.h - be a handoff cluster worker from C, on your own libevent
 * event_base.
 *
 * `handoff cluster --port P --workers N --dir D --worker-cmd PATH` runs
 * PATH as each worker. The master passes the channel and the worker's
 * identity in the environment (HANDOFF_CHANNEL_FD, HANDOFF_WORKER_INDEX,
 * HANDOFF_GEN, HANDOFF_DIR, HANDOFF_OPT_<NAME> for each service option,
 * e.g. HANDOFF_OPT_MAX_FRAME); handoff_worker_new() reads it.
 *
 * The library hands you connections (a descriptor plus the bytes already
 * read from it), asks for them back between requests (a restart), and
 * tells you when to stop. You serve them on your base, and report every
 * connection you close. One connection is owned by exactly one process:
 * once handoff_release() returns 0, the descriptor is no longer yours.
 *
 * Every function returns 0 or a negative HANDOFF_E* code; nothing panics
 * or aborts across this boundary. Not thread-safe: call everything from
 * the thread that runs the base.
 *
 * Link: -lhandoff -levent (and -lpthread -ldl -lm with libhandoff.a).
 * Examples: examples/c/echo_worker.c (the smallest), examples/c/rpc_worker.c
 * (the rpc service); `make` builds them into build/.
 */
#ifndef HANDOFF_H
#define HANDOFF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
typedef struct handoff_worker handoff_worker;

/* Error codes (negative returns). */
#define HANDOFF_EINVAL   (-1) /* a bad argument (NULL, unknown id)       */
#define HANDOFF_ENOENV   (-2) /* not started by a master: no environment */
#define HANDOFF_EIO      (-3) /* a system call failed (errno is kept)    */
#define HANDOFF_ESTATE   (-4) /* not now: the worker is stopping/gone    */
#define HANDOFF_EPANIC   (-5) /* an internal error was caught            */

typedef struct handoff_callbacks {
    /* A connection to serve. `fd` is yours now (non-blocking). `readahead`
     * (`len` bytes) was read from it by its previous owner: process it
     * before what you read next. (With a bufferevent, put it in the input
     * buffer, whose end a socket bufferevent keeps frozen:
     * evbuffer_unfreeze(in, 0); evbuffer_add(in, readahead, len);
     * evbuffer_freeze(in, 0). A plain evbuffer_add fails there.) `state`
     * (`state_len` bytes) is what the previous owner passed to
     * handoff_release (empty for a new client). Both buffers are valid
     * during the call only. `id` names the connection in
     * handoff_release/handoff_closed. Required. */
    void (*on_conn)(handoff_worker *w, uint64_t id, int fd, const void *readahead, size_t len,
                    const void *state, size_t state_len, void *arg);
    /* Restart (or rebalance): give every connection back with
     * handoff_release as soon as it is between requests (nothing consumed
     * unanswered, output flushed). Stop accepting new work. The base's
     * loop exits once every connection is released. Required. */
    void (*on_drain)(handoff_worker *w, void *arg);
    /* Stop: finish the requests in progress, close every connection
     * (reporting each with handoff_closed). The loop exits when none is
     * left. Required. */
    void (*on_shutdown)(handoff_worker *w, void *arg);
    /* The master is gone: close every connection now (no need to report
     * them); the loop exits. Optional (NULL: nothing to do). */
    void (*on_lost)(handoff_worker *w, void *arg);
} handoff_callbacks;

/* Reads the environment, takes the channel and registers it on `base`.
 * Also: SIGPIPE is ignored, the process dies with its master
 * (PR_SET_PDEATHSIG), RLIMIT_NOFILE is raised to its hard limit, and the
 * channel is made close-on-exec (the environment is left unchanged). The
 * channel can be taken once per process. HANDOFF_LOG_LEVEL (off, error,
 * warn, info, debug, trace; the master sets its own) sets what the
 * library logs on stderr.
 * `cb` is copied; `arg` is passed to every callback. On success *out is a
 * worker to free with handoff_worker_free() after the loop exits. */
int handoff_worker_new(struct event_base *base, const handoff_callbacks *cb, void *arg, handoff_worker **out);

/* This worker's index (0-based) and the cluster's generation (1, then +1
 * at each restart). */
int handoff_worker_index(const handoff_worker *w);
uint64_t handoff_worker_gen(const handoff_worker *w);

/* Gives connection `id` back between requests: `fd`, the bytes received
 * and not consumed (`unconsumed`, `len`: a partial request), and the state
 * to hand the next owner's on_conn (may be NULL/0). The library owns `fd`
 * from now on, on success and on error alike; stop using it (do not close
 * it). If it sits in a bufferevent, copy the input out, then
 * bufferevent_disable(bev, EV_READ | EV_WRITE) and free it (without
 * BEV_OPT_CLOSE_ON_FREE) before this call: the descriptor lives on in
 * another process, so its events must leave epoll while it is still open
 * here, and bufferevent_free alone, called from the bufferevent's own
 * callback, removes them only after the callback returns. */
int handoff_release(handoff_worker *w, uint64_t id, int fd, const void *unconsumed, size_t len, const void *state,
                    size_t state_len);

/* Reports that you closed connection `id` (call after close(fd)). The
 * master keeps a copy of each descriptor it handed over until it hears of
 * the close, so end the TCP connection yourself first:
 * shutdown(fd, SHUT_RDWR), then close(fd) (events out of epoll before, as
 * for handoff_release). */
int handoff_closed(handoff_worker *w, uint64_t id);

/* Counts `n` requests served (shown by `handoff status`). */
int handoff_served(handoff_worker *w, uint64_t n);

/* Bufferevent helpers: most workers serve connections on bufferevents,
 * and these get the two libevent details right.
 *
 * handoff_bufferevent_new: a socket bufferevent on `fd` (made without
 * BEV_OPT_CLOSE_ON_FREE: the descriptor stays under handoff's rules) whose
 * input already holds the read-ahead, ready for bufferevent_setcb/enable.
 * (A socket bufferevent keeps the end of its input frozen; a plain
 * evbuffer_add of the read-ahead would fail.) NULL on error.
 *
 * handoff_release_bufferevent: gives connection `id` back from its
 * bufferevent: disables and frees `bev`, then handoff_release() with its
 * descriptor and its unread input. Call it between requests, with the
 * output flushed.
 *
 * handoff_close_bufferevent: closes connection `id`: disables and frees
 * `bev`, shuts the descriptor down and closes it, then handoff_closed().
 *
 * Both free `bev` whatever they return; do not use it again. */
struct bufferevent;
struct bufferevent *handoff_bufferevent_new(struct event_base *base, int fd, const void *readahead, size_t len);
int handoff_release_bufferevent(handoff_worker *w, uint64_t id, struct bufferevent *bev, const void *state,
                                size_t state_len);
int handoff_close_bufferevent(handoff_worker *w, uint64_t id, struct bufferevent *bev);

/* Frees the worker (after the loop exits, or to give up early, even from
 * a callback: the master then rescues the connections it handed over;
 * no callback comes after). NULL is a no-op. */
void handoff_worker_free(handoff_worker *w);

/* A static description of a HANDOFF_E* code. */
const char *handoff_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif /* HANDOFF_H */
