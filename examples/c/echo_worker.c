/* echo_worker.c - the smallest libhandoff worker: echoes lines. A restart moves each connection
 * between lines, with its partial line. (Allocation failures are not handled, for brevity.) */
#include <stdlib.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include "handoff.h"

struct conn { handoff_worker *w; uint64_t id; int eof; struct bufferevent *bev; struct conn *next, **pprev; };
static struct conn *conns;
static int draining, stopping;

static void done(struct conn *c) { /* between lines: give it back (a restart) or close it */
    if (draining && !c->eof) handoff_release_bufferevent(c->w, c->id, c->bev, NULL, 0);
    else handoff_close_bufferevent(c->w, c->id, c->bev);
    if ((*c->pprev = c->next)) c->next->pprev = c->pprev;
    free(c);
}
static int flushed(struct conn *c) { return !evbuffer_get_length(bufferevent_get_output(c->bev)); }
static void on_read(struct bufferevent *bev, void *c) {
    size_t n;
    for (char *line; (line = evbuffer_readln(bufferevent_get_input(bev), &n, EVBUFFER_EOL_LF)); free(line)) {
        bufferevent_write(bev, line, n);
        bufferevent_write(bev, "\n", 1);
        handoff_served(((struct conn *)c)->w, 1);
    }
}
static void on_flushed(struct bufferevent *bev, void *c) {
    if (((struct conn *)c)->eof || draining || stopping) done(c);
}
static void on_event(struct bufferevent *bev, short what, void *c) { /* EOF or error */
    ((struct conn *)c)->eof = 1;
    if ((what & BEV_EVENT_ERROR) || flushed(c)) done(c);
}
static void on_conn(handoff_worker *w, uint64_t id, int fd, const void *ahead, size_t len, const void *state,
                    size_t state_len, void *base) {
    struct conn *c = malloc(sizeof *c);
    *c = (struct conn){w, id, 0, handoff_bufferevent_new(base, fd, ahead, len), conns, &conns};
    if ((conns = c)->next) c->next->pprev = &c->next;
    bufferevent_setcb(c->bev, on_read, on_flushed, on_event, c);
    bufferevent_enable(c->bev, EV_READ);
    on_read(c->bev, c); /* the read-ahead first */
}
static void finish_flushed(void) { /* the others go from on_flushed */
    for (struct conn *c = conns, *next; c; c = next) {
        next = c->next;
        if (flushed(c)) done(c);
    }
}
static void on_drain(handoff_worker *w, void *arg) { draining = 1; stopping = 0; finish_flushed(); }
static void on_shutdown(handoff_worker *w, void *arg) { stopping = 1; finish_flushed(); }
static void on_lost(handoff_worker *w, void *arg) { draining = 0; while (conns) done(conns); }

int main(void) {
    struct event_base *base = event_base_new();
    handoff_callbacks cb = {on_conn, on_drain, on_shutdown, on_lost};
    handoff_worker *w;
    if (handoff_worker_new(base, &cb, base, &w) < 0) return 1; /* the library says why on stderr */
    event_base_dispatch(base);
    handoff_worker_free(w);
    event_base_free(base);
    return 0;
}
