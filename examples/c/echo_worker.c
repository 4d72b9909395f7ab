/* echo_worker.c - the smallest libhandoff worker: echoes lines. A restart moves its connections
 * between lines, a partial line along. (Allocation failures are not handled, for brevity.)
 *   handoff cluster --port 0 --dir D --worker-cmd build/echo_worker */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include "handoff.h"

struct conn { handoff_worker *w; uint64_t id; int fd, eof; struct bufferevent *bev; struct conn *next, **pprev; };
static struct conn *conns;
static int draining, stopping;

static void done(struct conn *c, int release) { /* gives it back (with its partial line) or closes it */
    struct evbuffer *rest = evbuffer_new();
    evbuffer_add_buffer(rest, bufferevent_get_input(c->bev));
    bufferevent_disable(c->bev, EV_READ | EV_WRITE); /* out of epoll while the fd is ours */
    bufferevent_free(c->bev);
    if (release) {
        handoff_release(c->w, c->id, c->fd, evbuffer_pullup(rest, -1), evbuffer_get_length(rest), NULL, 0);
    } else { /* the master holds a copy of fd until it hears of the close: shut down */
        shutdown(c->fd, SHUT_RDWR);
        close(c->fd);
        handoff_closed(c->w, c->id);
    }
    evbuffer_free(rest);
    if ((*c->pprev = c->next)) c->next->pprev = c->pprev;
    free(c);
}
static int flushed(struct conn *c) { return !evbuffer_get_length(bufferevent_get_output(c->bev)); }
static void on_read(struct bufferevent *bev, void *arg) {
    size_t n;
    for (char *line; (line = evbuffer_readln(bufferevent_get_input(bev), &n, EVBUFFER_EOL_LF)); free(line)) {
        bufferevent_write(bev, line, n);
        bufferevent_write(bev, "\n", 1);
        handoff_served(((struct conn *)arg)->w, 1);
    }
}
static void on_flushed(struct bufferevent *bev, void *arg) { /* between lines */
    struct conn *c = arg;
    (void)bev;
    if (c->eof || stopping || draining) done(c, draining && !c->eof);
}
static void on_event(struct bufferevent *bev, short what, void *arg) { /* EOF or error */
    struct conn *c = arg;
    (void)bev;
    c->eof = 1;
    if ((what & BEV_EVENT_ERROR) || flushed(c)) done(c, 0);
}
static void on_conn(handoff_worker *w, uint64_t id, int fd, const void *readahead, size_t len, const void *state,
                    size_t state_len, void *base) {
    struct conn *c = malloc(sizeof *c);
    (void)state, (void)state_len;
    *c = (struct conn){w, id, fd, 0, bufferevent_socket_new(base, fd, 0), conns, &conns};
    if (conns) conns->pprev = &c->next;
    conns = c;
    struct evbuffer *in = bufferevent_get_input(c->bev); /* read-ahead first (the input's end is frozen) */
    evbuffer_unfreeze(in, 0);
    evbuffer_add(in, readahead, len);
    evbuffer_freeze(in, 0);
    bufferevent_setcb(c->bev, on_read, on_flushed, on_event, c);
    bufferevent_enable(c->bev, EV_READ);
    on_read(c->bev, c);
}
static void finish(int release) { /* the flushed ones now, the others from on_flushed */
    for (struct conn *c = conns, *next; c; c = next) {
        next = c->next;
        if (flushed(c)) done(c, release);
    }
}
static void on_drain(handoff_worker *w, void *a) { (void)w, (void)a; draining = 1, stopping = 0; finish(1); }
static void on_shutdown(handoff_worker *w, void *a) { (void)w, (void)a; stopping = 1; finish(0); }
static void on_lost(handoff_worker *w, void *a) { (void)w, (void)a; while (conns) done(conns, 0); }

int main(void) {
    struct event_base *base = event_base_new();
    handoff_callbacks cb = {on_conn, on_drain, on_shutdown, on_lost};
    handoff_worker *w;
    int rc = handoff_worker_new(base, &cb, base, &w);
    if (rc < 0) {
        fprintf(stderr, "echo_worker: %s\n", handoff_strerror(rc));
        return 1;
    }
    event_base_dispatch(base);
    handoff_worker_free(w);
    event_base_free(base);
    return 0;
}
