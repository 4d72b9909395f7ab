/* echo_worker.c - the smallest libhandoff worker: echoes each line back. A
 * restart moves its connections between lines (a partial line goes along).
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

/* Gives the connection back (`release`: with its partial line) or closes it. */
static void done(struct conn *c, int release) {
    struct evbuffer *rest = evbuffer_new();
    evbuffer_add_buffer(rest, bufferevent_get_input(c->bev));
    bufferevent_disable(c->bev, EV_READ | EV_WRITE); /* out of epoll before the fd leaves */
    bufferevent_free(c->bev);
    if (release) {
        handoff_release(c->w, c->id, c->fd, evbuffer_pullup(rest, -1), evbuffer_get_length(rest), NULL, 0);
    } else {
        shutdown(c->fd, SHUT_RDWR); /* the master holds a copy until it hears of the close */
        close(c->fd);
        handoff_closed(c->w, c->id);
    }
    evbuffer_free(rest);
    if ((*c->pprev = c->next)) c->next->pprev = c->pprev;
    free(c);
}
static void on_read(struct bufferevent *bev, void *arg) {
    struct conn *c = arg;
    size_t n;
    for (char *line; (line = evbuffer_readln(bufferevent_get_input(bev), &n, EVBUFFER_EOL_LF)); free(line)) {
        bufferevent_write(bev, line, n);
        bufferevent_write(bev, "\n", 1);
        handoff_served(c->w, 1);
    }
}
static void on_flushed(struct bufferevent *bev, void *arg) { /* between lines */
    struct conn *c = arg;
    (void)bev;
    if (c->eof || stopping || draining) done(c, draining && !c->eof);
}
static void on_event(struct bufferevent *bev, short what, void *arg) { /* EOF or error */
    struct conn *c = arg;
    c->eof = 1;
    if ((what & BEV_EVENT_ERROR) || !evbuffer_get_length(bufferevent_get_output(bev))) done(c, 0);
}
static void on_conn(handoff_worker *w, uint64_t id, int fd, const void *readahead, size_t len, const void *state,
                    size_t state_len, void *arg) {
    struct conn *c = calloc(1, sizeof *c);
    (void)state, (void)state_len, (void)arg;
    *c = (struct conn){w, id, fd, 0, bufferevent_socket_new(arg, fd, 0), conns, &conns};
    if (conns) conns->pprev = &c->next;
    conns = c;
    bufferevent_setcb(c->bev, on_read, on_flushed, on_event, c);
    evbuffer_unfreeze(bufferevent_get_input(c->bev), 0); /* a bufferevent's input is frozen at the end */
    evbuffer_add(bufferevent_get_input(c->bev), readahead, len);
    evbuffer_freeze(bufferevent_get_input(c->bev), 0);
    bufferevent_enable(c->bev, EV_READ);
    on_read(c->bev, c);
}
/* Restart (draining) or stop: every connection with its output flushed goes now, the rest once flushed. */
static void finish(struct conn *c, int release) {
    for (struct conn *next; c; c = next) {
        next = c->next;
        if (!evbuffer_get_length(bufferevent_get_output(c->bev))) done(c, release);
    }
}
static void on_drain(handoff_worker *w, void *arg) { (void)w, (void)arg; draining = 1, stopping = 0; finish(conns, 1); }
static void on_shutdown(handoff_worker *w, void *arg) { (void)w, (void)arg; stopping = 1; finish(conns, 0); }
static void on_lost(handoff_worker *w, void *arg) { (void)w, (void)arg; while (conns) done(conns, 0); }

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
