/*
 * rpc_worker.c - the rpc service as a C cluster worker, on libhandoff and
 * its own libevent event_base (one bufferevent per connection).
 *
 *   handoff cluster --port 0 --workers 2 --dir D --worker-cmd build/rpc_worker
 *
 * Protocol (the Rust workers' rpc service): each frame is a u32
 * little-endian length, then that many bytes of JSON.
 *   {"in":"ping","params":X} -> {"out":"pong","result":X}  (X as sent, byte for byte)
 *   {"in":"whoami"}          -> {"out":"whoami","result":{"worker":I,"pid":N,"gen":G,"lang":"c"}}
 *   anything else            -> {"out":"error","result":"<reason>"}
 * A frame announcing more than the maximum frame size closes the
 * connection. That size is --max-frame N if given, else the environment's
 * HANDOFF_OPT_MAX_FRAME (which `handoff cluster --max-frame N` sets), else
 * 1 MiB.
 *
 * Requests on a connection are answered in order (pipelining welcome). A
 * restart asks for every connection back: each is released as soon as it
 * is between requests (every complete request answered, output flushed),
 * with the bytes of a request still arriving. On shutdown, requests in
 * progress finish and connections close.
 *
 * The JSON scanner below validates a request (RFC 8259, UTF-8 checked,
 * nesting limited) without building anything: a ping's params are echoed
 * as the exact bytes received. Malformed input gets an error reply.
 *
 * Build: cc -std=c11 -D_GNU_SOURCE -Icsrc examples/c/rpc_worker.c \
 *          build/libhandoff.a $(pkg-config --libs libevent) -lpthread -ldl -lm
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "handoff.h"

#define DEFAULT_MAX_FRAME ((size_t)1 << 20)
/* Stop answering a connection while this much output waits (a client that
 * does not read); go on once it is flushed. */
#define OUTPUT_LIMIT ((size_t)1 << 20)
/* Reading pauses past a whole frame plus this much. */
#define READ_SLACK ((size_t)64 << 10)
/* Deepest nesting of arrays/objects accepted (serde_json's limit). */
#define JSON_MAX_DEPTH 128

struct server;

/* One connection this worker serves. */
struct conn {
    struct server *srv;
    uint64_t id;
    int fd;
    struct bufferevent *bev;
    struct conn *prev, *next;
    int eof;       /* the client sent EOF */
    int throttled; /* output over OUTPUT_LIMIT: reading paused until flushed */
    int closing;   /* close once the output is flushed */
    int releasing; /* give back once the output is flushed */
};

struct server {
    struct event_base *base;
    handoff_worker *w;
    int index;
    size_t max_frame;
    char whoami[192]; /* the whoami reply's JSON */
    size_t whoami_len;
    struct conn *conns;
    int draining; /* a restart: give every connection back */
    int stopping; /* finish and close */
    struct evbuffer *replies; /* one serve()'s answers, before they are written */
};

static int g_index = -1;

static void note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "rpc_worker[%d] pid %ld: ", g_index, (long)getpid());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ------------------------------------------------------------------ JSON */

struct scan {
    const unsigned char *p, *end;
    const char *err; /* the first error */
};

/* What a request says, as spans of its text ("in" includes the quotes). */
struct request {
    const unsigned char *in, *in_end;
    const unsigned char *params, *params_end;
};

static int bad(struct scan *s, const char *why) {
    if (!s->err)
        s->err = why;
    return -1;
}

static void skip_ws(struct scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char ch = p[i];
        v <<= 4;
        if (ch >= '0' && ch <= '9')
            v |= (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f')
            v |= (unsigned)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F')
            v |= (unsigned)(ch - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* One UTF-8 character of 2 to 4 bytes at s->p (no overlong form, no
 * surrogate, nothing above U+10FFFF). */
static int utf8_char(struct scan *s) {
    const unsigned char *p = s->p;
    size_t left = (size_t)(s->end - p), n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (p[0] >= 0xC2 && p[0] <= 0xDF) {
        n = 2;
    } else if (p[0] >= 0xE0 && p[0] <= 0xEF) {
        n = 3;
        if (p[0] == 0xE0)
            lo = 0xA0;
        else if (p[0] == 0xED)
            hi = 0x9F;
    } else if (p[0] >= 0xF0 && p[0] <= 0xF4) {
        n = 4;
        if (p[0] == 0xF0)
            lo = 0x90;
        else if (p[0] == 0xF4)
            hi = 0x8F;
    } else {
        return bad(s, "invalid UTF-8");
    }
    if (left < n || p[1] < lo || p[1] > hi)
        return bad(s, "invalid UTF-8");
    for (size_t i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xBF)
            return bad(s, "invalid UTF-8");
    s->p += n;
    return 0;
}

static int string(struct scan *s) {
    s->p++; /* the opening quote */
    while (s->p < s->end) {
        unsigned char ch = *s->p;
        if (ch == '"') {
            s->p++;
            return 0;
        }
        if (ch < 0x20)
            return bad(s, "control character in a string");
        if (ch == '\\') {
            unsigned v;
            if (s->end - s->p < 2)
                break;
            switch (s->p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                s->p += 2;
                break;
            case 'u':
                if (s->end - s->p < 6 || hex4(s->p + 2, &v) < 0)
                    return bad(s, "invalid \\u escape");
                s->p += 6;
                break;
            default:
                return bad(s, "invalid escape");
            }
        } else if (ch >= 0x80) {
            if (utf8_char(s) < 0)
                return -1;
        } else {
            s->p++;
        }
    }
    return bad(s, "EOF while parsing a string");
}

static int digits(struct scan *s) {
    const unsigned char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
        s->p++;
    return s->p > start ? 0 : -1;
}

static int number(struct scan *s) {
    if (*s->p == '-')
        s->p++;
    if (s->p < s->end && *s->p == '0')
        s->p++;
    else if (digits(s) < 0)
        return bad(s, "invalid number");
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (digits(s) < 0)
            return bad(s, "invalid number");
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (digits(s) < 0)
            return bad(s, "invalid number");
    }
    return 0;
}

static int literal(struct scan *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return bad(s, "expected value");
    s->p += n;
    return 0;
}

/* A string token (with its quotes) decoded into `out`, if it is short and
 * ASCII (the only names compared); -1 otherwise. */
static int ascii_name(const unsigned char *p, const unsigned char *end, char *out, size_t cap) {
    size_t n = 0;
    for (p++, end--; p < end; n++) {
        unsigned ch = *p;
        if (ch == '\\') {
            switch (p[1]) {
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'n': ch = '\n'; break;
            case 'r': ch = '\r'; break;
            case 't': ch = '\t'; break;
            case 'u':
                if (hex4(p + 2, &ch) < 0)
                    return -1;
                p += 4;
                break;
            default: ch = p[1]; break; /* " \ / */
            }
            p += 2;
        } else {
            p++;
        }
        if (ch >= 0x80 || n >= cap)
            return -1;
        out[n] = (char)ch;
    }
    return (int)n;
}

static int value(struct scan *s, int depth, struct request *req);

static int array(struct scan *s, int depth) {
    s->p++;
    skip_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return 0;
    }
    for (;;) {
        if (value(s, depth, NULL) < 0)
            return -1;
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == ']') {
            s->p++;
            return 0;
        }
        return bad(s, s->p < s->end ? "expected ',' or ']'" : "EOF while parsing a list");
    }
}

/* An object; with `req`, its "in" and "params" members are noted (the
 * last of each, as serde_json keeps). */
static int object(struct scan *s, int depth, struct request *req) {
    s->p++;
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 0;
    }
    for (;;) {
        skip_ws(s);
        if (s->p >= s->end || *s->p != '"')
            return bad(s, s->p < s->end ? "key must be a string" : "EOF while parsing an object");
        const unsigned char *key = s->p;
        if (string(s) < 0)
            return -1;
        const unsigned char *key_end = s->p;
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':')
            return bad(s, s->p < s->end ? "expected ':'" : "EOF while parsing an object");
        s->p++;
        skip_ws(s);
        const unsigned char *v = s->p;
        if (value(s, depth, NULL) < 0)
            return -1;
        if (req) {
            char name[8];
            int n = ascii_name(key, key_end, name, sizeof name);
            if (n == 2 && memcmp(name, "in", 2) == 0) {
                req->in = v;
                req->in_end = s->p;
            } else if (n == 6 && memcmp(name, "params", 6) == 0) {
                req->params = v;
                req->params_end = s->p;
            }
        }
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == '}') {
            s->p++;
            return 0;
        }
        return bad(s, s->p < s->end ? "expected ',' or '}'" : "EOF while parsing an object");
    }
}

/* One value; `depth` containers enclose it. */
static int value(struct scan *s, int depth, struct request *req) {
    skip_ws(s);
    if (s->p >= s->end)
        return bad(s, "EOF while parsing a value");
    switch (*s->p) {
    case '{':
    case '[':
        if (depth >= JSON_MAX_DEPTH)
            return bad(s, "recursion limit exceeded");
        return *s->p == '{' ? object(s, depth + 1, req) : array(s, depth + 1);
    case '"':
        return string(s);
    case 't':
        return literal(s, "true");
    case 'f':
        return literal(s, "false");
    case 'n':
        return literal(s, "null");
    default:
        if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9'))
            return number(s);
        return bad(s, "expected value");
    }
}

/* -------------------------------------------------------------- replies */

static const char HEX[] = "0123456789abcdef";

/* Bytes of `p` (valid UTF-8) as the inside of a JSON string. */
static size_t escaped_len(const unsigned char *p, size_t n) {
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        len += (p[i] == '"' || p[i] == '\\') ? 2 : p[i] < 0x20 ? 6 : 1;
    return len;
}

static void add_escaped(struct evbuffer *out, const unsigned char *p, size_t n) {
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        char esc[6];
        size_t k;
        if (p[i] == '"' || p[i] == '\\') {
            esc[0] = '\\', esc[1] = (char)p[i], k = 2;
        } else if (p[i] < 0x20) {
            memcpy(esc, "\\u00", 4), esc[4] = HEX[p[i] >> 4], esc[5] = HEX[p[i] & 15], k = 6;
        } else {
            continue;
        }
        evbuffer_add(out, p + run, i - run);
        evbuffer_add(out, esc, k);
        run = i + 1;
    }
    evbuffer_add(out, p + run, n - run);
}

static void add_header(struct evbuffer *out, size_t len) {
    unsigned char h[4] = {(unsigned char)len, (unsigned char)(len >> 8), (unsigned char)(len >> 16),
                          (unsigned char)(len >> 24)};
    evbuffer_add(out, h, 4);
}

/* Appends one frame {"out":"error","result":"<why><what>"} (`what`, raw
 * request text, is escaped). -1 if out of memory. */
static int error_reply(struct evbuffer *out, const char *why, const unsigned char *what, size_t what_len) {
    static const char head[] = "{\"out\":\"error\",\"result\":\"", tail[] = "\"}";
    size_t why_len = strlen(why), wlen = what ? escaped_len(what, what_len) : 0;
    size_t len = sizeof head - 1 + escaped_len((const unsigned char *)why, why_len) + wlen + sizeof tail - 1;
    if (len > UINT32_MAX || evbuffer_expand(out, 4 + len) < 0)
        return -1;
    add_header(out, len);
    evbuffer_add(out, head, sizeof head - 1);
    add_escaped(out, (const unsigned char *)why, why_len);
    if (what)
        add_escaped(out, what, what_len);
    evbuffer_add(out, tail, sizeof tail - 1);
    return 0;
}

/* Appends the reply to one request body. -1 if out of memory. */
static int answer(const struct server *srv, const unsigned char *body, size_t n, struct evbuffer *out) {
    struct scan s = {body, body + n, NULL};
    struct request req = {0};
    int rc = value(&s, 0, &req);
    if (rc == 0) {
        skip_ws(&s);
        if (s.p != s.end)
            rc = bad(&s, "trailing characters");
    }
    if (rc < 0) {
        char why[96];
        snprintf(why, sizeof why, "bad JSON: %s at byte %zu", s.err, (size_t)(s.p - body));
        return error_reply(out, why, NULL, 0);
    }
    const unsigned char *first = body;
    while (first < s.end && (*first == ' ' || *first == '\t' || *first == '\n' || *first == '\r'))
        first++;
    if (*first != '{')
        return error_reply(out, "request is not a JSON object", NULL, 0);
    if (!req.in)
        return error_reply(out, "missing \"in\"", NULL, 0);
    if (*req.in != '"')
        return error_reply(out, "\"in\" is not a string", NULL, 0);
    char name[8];
    int k = ascii_name(req.in, req.in_end, name, sizeof name);
    if (k == 4 && memcmp(name, "ping", 4) == 0) {
        static const char head[] = "{\"out\":\"pong\",\"result\":";
        if (!req.params)
            return error_reply(out, "ping: missing \"params\"", NULL, 0);
        size_t plen = (size_t)(req.params_end - req.params), len = sizeof head - 1 + plen + 1;
        if (evbuffer_expand(out, 4 + len) < 0)
            return -1;
        add_header(out, len);
        evbuffer_add(out, head, sizeof head - 1);
        evbuffer_add(out, req.params, plen);
        evbuffer_add(out, "}", 1);
        return 0;
    }
    if (k == 6 && memcmp(name, "whoami", 6) == 0) {
        if (evbuffer_expand(out, 4 + srv->whoami_len) < 0)
            return -1;
        add_header(out, srv->whoami_len);
        evbuffer_add(out, srv->whoami, srv->whoami_len);
        return 0;
    }
    return error_reply(out, "unknown \"in\": ", req.in, (size_t)(req.in_end - req.in));
}

/* ---------------------------------------------------------- connections */

static void unlink_conn(struct conn *c) {
    struct server *srv = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
}

/* Frees the bufferevent, its events out of epoll first: the descriptor
 * stays open elsewhere (the master's copy, the next owner). */
static void drop_bev(struct conn *c) {
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    bufferevent_free(c->bev);
    c->bev = NULL;
}

/* Closes for good. `report`: tell the library (not once the master is
 * lost). Shut down first: the master keeps a copy of the descriptor (to
 * rescue the connection should we die) until it learns of the close. */
static void close_conn(struct conn *c, int report) {
    struct server *srv = c->srv;
    unlink_conn(c);
    drop_bev(c);
    shutdown(c->fd, SHUT_RDWR);
    close(c->fd);
    if (report)
        handoff_closed(srv->w, c->id);
    free(c);
}

/* Gives the connection back (restart): descriptor and unconsumed input. */
static void release_conn(struct conn *c) {
    struct server *srv = c->srv;
    struct evbuffer *rest = evbuffer_new();
    if (!rest || evbuffer_add_buffer(rest, bufferevent_get_input(c->bev)) < 0) {
        note("out of memory releasing connection %llu; closing it", (unsigned long long)c->id);
        if (rest)
            evbuffer_free(rest);
        close_conn(c, 1);
        return;
    }
    unlink_conn(c);
    drop_bev(c);
    size_t len = evbuffer_get_length(rest);
    const unsigned char *data = len ? evbuffer_pullup(rest, -1) : NULL;
    if (len && !data) {
        note("out of memory releasing connection %llu; closing it", (unsigned long long)c->id);
        shutdown(c->fd, SHUT_RDWR);
        close(c->fd);
        handoff_closed(srv->w, c->id);
    } else {
        int rc = handoff_release(srv->w, c->id, c->fd, data, len, NULL, 0);
        if (rc < 0)
            note("handoff_release: %s", handoff_strerror(rc));
    }
    evbuffer_free(rest);
    free(c);
}

/* After serving: close, release, or wait, as the connection's and the
 * worker's state ask. Returns -1 if the connection is gone. */
static int settle(struct conn *c) {
    struct server *srv = c->srv;
    if (c->throttled)
        return 0; /* the write callback serves the rest */
    size_t unsent = evbuffer_get_length(bufferevent_get_output(c->bev));
    size_t unread = evbuffer_get_length(bufferevent_get_input(c->bev));
    int close_now = c->eof || (srv->stopping && unread == 0);
    if (close_now || srv->draining) {
        if (unsent == 0) {
            if (close_now)
                close_conn(c, 1);
            else
                release_conn(c);
            return -1;
        }
        if (close_now)
            c->closing = 1;
        else
            c->releasing = 1;
        bufferevent_disable(c->bev, EV_READ);
    }
    return 0;
}

/* Writes `replies` at once when nothing is queued before them (one send,
 * no write event: a request is answered in the callback that read it),
 * and queues what the kernel did not take on the bufferevent. */
static void write_through(struct conn *c, struct evbuffer *replies) {
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (evbuffer_get_length(out) == 0)
        (void)evbuffer_write(replies, c->fd); /* EAGAIN or an error: the bufferevent retries and reports */
    if (evbuffer_get_length(replies) > 0)
        evbuffer_add_buffer(out, replies);
}

/* Answers every complete request buffered, in order, then settles.
 * Returns -1 if the connection is gone. */
static int serve(struct conn *c) {
    struct server *srv = c->srv;
    struct evbuffer *in = bufferevent_get_input(c->bev), *out = bufferevent_get_output(c->bev);
    struct evbuffer *replies = srv->replies;
    uint64_t served = 0;
    int gone = 0;
    while (!c->closing && !c->releasing) {
        if (evbuffer_get_length(out) + evbuffer_get_length(replies) >= OUTPUT_LIMIT) {
            c->throttled = 1;
            bufferevent_disable(c->bev, EV_READ);
            break;
        }
        unsigned char h[4];
        size_t avail = evbuffer_get_length(in);
        if (avail < 4)
            break;
        evbuffer_copyout(in, h, 4);
        size_t n = (size_t)h[0] | (size_t)h[1] << 8 | (size_t)h[2] << 16 | (size_t)h[3] << 24;
        if (n > srv->max_frame) {
            note("frame of %zu bytes exceeds --max-frame %zu; closing", n, srv->max_frame);
            gone = 1;
            break;
        }
        if (avail - 4 < n)
            break;
        unsigned char *frame = evbuffer_pullup(in, (ev_ssize_t)(4 + n));
        if (!frame || answer(srv, frame + 4, n, replies) < 0) {
            note("out of memory; closing connection %llu", (unsigned long long)c->id);
            gone = 1;
            break;
        }
        evbuffer_drain(in, 4 + n);
        served++;
    }
    if (served)
        handoff_served(srv->w, served);
    if (gone) {
        write_through(c, replies); /* the answers before the bad frame, as far as the kernel takes them */
        close_conn(c, 1);
        return -1;
    }
    if (evbuffer_get_length(replies) > 0)
        write_through(c, replies);
    return settle(c);
}

static void read_cb(struct bufferevent *bev, void *arg) {
    (void)bev;
    serve(arg);
}

/* The output is flushed. */
static void write_cb(struct bufferevent *bev, void *arg) {
    struct conn *c = arg;
    if (c->closing) {
        close_conn(c, 1);
    } else if (c->releasing) {
        release_conn(c);
    } else if (c->throttled) {
        c->throttled = 0;
        if (!c->eof)
            bufferevent_enable(bev, EV_READ);
        serve(c);
    }
}

static void event_cb(struct bufferevent *bev, short what, void *arg) {
    struct conn *c = arg;
    (void)bev;
    if (what & BEV_EVENT_ERROR) {
        close_conn(c, 1);
    } else if (what & BEV_EVENT_EOF) {
        c->eof = 1; /* answer what is complete, then close */
        serve(c);
    }
}

/* ------------------------------------------------------------ callbacks */

static void on_conn(handoff_worker *w, uint64_t id, int fd, const void *readahead, size_t len, const void *state,
                    size_t state_len, void *arg) {
    struct server *srv = arg;
    (void)state, (void)state_len; /* rpc sessions have no state */
    struct conn *c = calloc(1, sizeof *c);
    struct bufferevent *bev = c ? bufferevent_socket_new(srv->base, fd, 0) : NULL;
    if (!bev) {
        note("out of memory; closing a new connection");
        free(c);
        shutdown(fd, SHUT_RDWR);
        close(fd);
        handoff_closed(w, id);
        return;
    }
    c->srv = srv;
    c->id = id;
    c->fd = fd;
    c->bev = bev;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    bufferevent_setcb(bev, read_cb, write_cb, event_cb, c);
    bufferevent_setwatermark(bev, EV_READ, 0, srv->max_frame + 4 + READ_SLACK);
    /* The read-ahead goes first. (A socket bufferevent keeps the end of
     * its input frozen: only its own reads may add there.) */
    struct evbuffer *in = bufferevent_get_input(bev);
    evbuffer_unfreeze(in, 0);
    int added = evbuffer_add(in, readahead, len);
    evbuffer_freeze(in, 0);
    if (added < 0) {
        note("out of memory; closing connection %llu", (unsigned long long)id);
        close_conn(c, 1);
        return;
    }
    bufferevent_enable(bev, EV_READ);
    serve(c);
}

/* Restart: every connection goes back between requests. (Called again
 * for a connection the master could not take.) */
static void on_drain(handoff_worker *w, void *arg) {
    struct server *srv = arg;
    (void)w;
    srv->draining = 1;
    srv->stopping = 0;
    for (struct conn *c = srv->conns, *next; c; c = next) {
        next = c->next;
        settle(c);
    }
}

static void on_shutdown(handoff_worker *w, void *arg) {
    struct server *srv = arg;
    (void)w;
    srv->stopping = 1;
    for (struct conn *c = srv->conns, *next; c; c = next) {
        next = c->next;
        settle(c);
    }
}

/* The master is gone: close everything now. */
static void on_lost(handoff_worker *w, void *arg) {
    struct server *srv = arg;
    (void)w;
    while (srv->conns)
        close_conn(srv->conns, 0);
}

/* ----------------------------------------------------------------- main */

/* A frame length is a u32: a larger limit is no limit. */
static int parse_size(const char *s, size_t *out) {
    if (!s || !*s)
        return -1;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9')
            return -1;
    errno = 0;
    unsigned long long v = strtoull(s, NULL, 10);
    if (errno == ERANGE || v > UINT32_MAX)
        v = UINT32_MAX;
    *out = (size_t)v;
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: rpc_worker [--max-frame N]\n"
                    "  run by a master: handoff cluster ... --worker-cmd PATH/rpc_worker\n");
}

int main(int argc, char **argv) {
    struct server srv = {0};
    const char *flag = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--max-frame") == 0 && i + 1 < argc) {
            flag = argv[++i];
        } else if (strncmp(argv[i], "--max-frame=", 12) == 0) {
            flag = argv[i] + 12;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage();
            return 0;
        } else {
            fprintf(stderr, "rpc_worker: unexpected argument '%s'\n", argv[i]);
            usage();
            return 2;
        }
    }
    const char *env = getenv("HANDOFF_OPT_MAX_FRAME");
    const char *limit = flag ? flag : env;
    srv.max_frame = DEFAULT_MAX_FRAME;
    if (limit && parse_size(limit, &srv.max_frame) < 0) {
        fprintf(stderr, "rpc_worker: %s%s: not a byte count\n", flag ? "--max-frame " : "HANDOFF_OPT_MAX_FRAME=", limit);
        return 2;
    }
    /* Group signals (a terminal's ^C, kill -- -PGID) are the master's to
     * act on: it tells the workers what to do. */
    static const int group[] = {SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGPIPE};
    for (size_t i = 0; i < sizeof group / sizeof group[0]; i++)
        signal(group[i], SIG_IGN);

    srv.base = event_base_new();
    srv.replies = evbuffer_new();
    if (!srv.base || !srv.replies) {
        fprintf(stderr, "rpc_worker: event_base_new failed\n");
        return 1;
    }
    const handoff_callbacks cb = {on_conn, on_drain, on_shutdown, on_lost};
    int rc = handoff_worker_new(srv.base, &cb, &srv, &srv.w);
    if (rc < 0) {
        fprintf(stderr, "rpc_worker: %s\n", handoff_strerror(rc));
        evbuffer_free(srv.replies);
        event_base_free(srv.base);
        return rc == HANDOFF_ENOENV ? 2 : 1;
    }
    srv.index = g_index = handoff_worker_index(srv.w);
    int k = snprintf(srv.whoami, sizeof srv.whoami,
                     "{\"out\":\"whoami\",\"result\":{\"worker\":%d,\"pid\":%ld,\"gen\":%llu,\"lang\":\"c\"}}",
                     srv.index, (long)getpid(), (unsigned long long)handoff_worker_gen(srv.w));
    srv.whoami_len = (size_t)k;

    event_base_dispatch(srv.base);

    /* The loop ends once every connection is gone. One still here (the
     * worker gave up early) is closed without a word: the master still
     * holds it and hands it to another worker. */
    while (srv.conns) {
        struct conn *c = srv.conns;
        unlink_conn(c);
        drop_bev(c);
        close(c->fd);
        free(c);
    }
    handoff_worker_free(srv.w);
    evbuffer_free(srv.replies);
    event_base_free(srv.base);
    return 0;
}
