/*
 * pair_epoll.c - the C yardstick for handoff's pair mode: one thread, epoll,
 * no libraries.
 *
 *   pair_epoll PORT PEER_PORT DIR
 *
 * Listens on TCP 127.0.0.1:PORT and on the SOCK_SEQPACKET Unix socket
 * DIR/PORT.sock, and keeps a channel connected to DIR/PEER_PORT.sock
 * (retried every 100 ms). Each client connection gets one request answered
 * ("rsp from port: PORT\n"), then moves to the peer: one sendmsg carrying
 * the descriptor (SCM_RIGHTS) and, as payload, a u32 length plus the bytes
 * already read but not yet served. The peer serves those bytes first, so
 * pipelined requests are neither lost nor read twice. While the channel is
 * down a server keeps its connections and serves them itself.
 *
 * Requests are 1 length byte N and N bytes. The read buffer is BUF_SIZE
 * bytes, enough for one maximal request, and small so that the read-ahead
 * that travels with each handoff stays small.
 *
 * Nothing blocks: channel sends that hit EAGAIN are queued until EPOLLOUT.
 * A descriptor leaves epoll (EPOLL_CTL_DEL) before it is sent, because
 * epoll tracks the open file description, which the peer still holds.
 * SIGINT/SIGTERM remove DIR/PORT.sock and exit 0. "ready" is printed on
 * stdout once both sockets listen.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#define BUF_SIZE 512          /* > 1 + 255: a full buffer always holds a request */
#define MAX_EVENTS 256
#define RETRY_MS 100
#define RECV_BURST 64         /* handoffs taken from one channel per wakeup */
#define HDR_LEN 4             /* u32 length of the read-ahead that follows */

enum kind { K_TCP_LISTEN, K_UNIX_LISTEN, K_SIGNAL, K_CHAN_OUT, K_CHAN_IN, K_CONN };

/* First member of everything registered with epoll (data.ptr). */
struct item {
    enum kind kind;
    int fd;
};

struct conn {
    struct item it;
    uint32_t watching;        /* events registered with epoll; 0: not registered */
    int eof;                  /* read returned 0 */
    size_t len;               /* bytes in buf, starting at a request boundary */
    unsigned char buf[BUF_SIZE];
    size_t out_off, out_len;  /* unsent part of the response */
    char out[32];
    struct conn *next;        /* handoff queue */
};

enum chan_state { CHAN_DOWN, CHAN_CONNECTING, CHAN_UP };

static struct {
    int ep;
    int port;
    char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char peer_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int sock_bound;
    char resp[32];
    size_t resp_len;
    struct item tcp, unx, sig;
    struct item chan;         /* outbound channel to the peer */
    enum chan_state chan_state;
    uint32_t chan_watching;
    uint64_t next_retry_ms;
    struct conn *q_head, *q_tail;   /* handoffs waiting for the channel */
} S;

static void conn_drive(struct conn *c);

static void logmsg(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "pair_epoll %d: ", S.port);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void die(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "pair_epoll %d: ", S.port);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (S.sock_bound)
        unlink(S.sock_path);
    exit(1);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Make epoll watch `want` on it (0: remove). *cur holds what is registered. */
static int ep_set(struct item *it, uint32_t *cur, uint32_t want)
{
    if (*cur == want)
        return 0;
    struct epoll_event ev = { .events = want, .data.ptr = it };
    int op = *cur == 0 ? EPOLL_CTL_ADD : want == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(S.ep, op, it->fd, &ev) == -1) {
        logmsg("epoll_ctl: %s", strerror(errno));
        return -1;
    }
    *cur = want;
    return 0;
}

/* ---- client connections ---- */

static struct conn *conn_new(int fd)
{
    struct conn *c = malloc(sizeof(*c));
    if (!c) {
        logmsg("malloc: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    c->it.kind = K_CONN;
    c->it.fd = fd;
    c->watching = 0;
    c->eof = 0;
    c->len = 0;
    c->out_off = c->out_len = 0;
    c->next = NULL;
    return c;
}

static void conn_close(struct conn *c)
{
    if (c->watching)
        epoll_ctl(S.ep, EPOLL_CTL_DEL, c->it.fd, NULL);
    close(c->it.fd);
    free(c);
}

/* Size of the complete request at the head of buf, 0 if incomplete. */
static size_t request_size(const struct conn *c)
{
    if (c->len == 0)
        return 0;
    size_t need = 1 + (size_t)c->buf[0];
    return c->len >= need ? need : 0;
}

/* Send the pending response: 1 all sent, 0 would block, -1 connection dead. */
static int conn_flush(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->it.fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -1;   /* client went away: not worth a log line */
        }
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
    return 1;
}

/* ---- the channel to the peer ---- */

/* One handoff = one SOCK_SEQPACKET message: header + read-ahead, fd attached.
 * Returns 0 or an errno value. */
static int send_conn(const struct conn *c)
{
    uint32_t hdr = (uint32_t)c->len;
    struct iovec iov[2] = {
        { .iov_base = &hdr, .iov_len = HDR_LEN },
        { .iov_base = (void *)c->buf, .iov_len = c->len },
    };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct msghdr msg = {
        .msg_iov = iov,
        .msg_iovlen = 2,
        .msg_control = ctl.buf,
        .msg_controllen = sizeof(ctl.buf),
    };
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &c->it.fd, sizeof(int));
    for (;;) {
        if (sendmsg(S.chan.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) != -1)
            return 0;
        if (errno != EINTR)
            return errno == EWOULDBLOCK ? EAGAIN : errno;
    }
}

/* Errors after which the channel itself is unusable. */
static int chan_dead_errno(int e)
{
    return e == EPIPE || e == ECONNRESET || e == ENOTCONN || e == ECONNREFUSED || e == EBADF;
}

static void chan_watch(uint32_t want)
{
    if (ep_set(&S.chan, &S.chan_watching, want) == -1)
        die("cannot watch the peer channel");
}

static void chan_up(void)
{
    S.chan_state = CHAN_UP;
    chan_watch(EPOLLIN);   /* the peer never writes: readable means it closed */
    logmsg("channel to %s up", S.peer_path);
}

/* Close the channel, take queued connections back, retry later. */
static void chan_down(void)
{
    if (S.chan_state == CHAN_UP)
        logmsg("channel to %s down, serving alone", S.peer_path);
    if (S.chan_watching)
        chan_watch(0);
    close(S.chan.fd);
    S.chan.fd = -1;
    S.chan_state = CHAN_DOWN;
    S.next_retry_ms = now_ms() + RETRY_MS;
    struct conn *c = S.q_head;
    S.q_head = S.q_tail = NULL;
    while (c) {
        struct conn *next = c->next;
        c->next = NULL;
        conn_drive(c);
        c = next;
    }
}

static void chan_connect(void)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        die("socket: %s", strerror(errno));
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, S.peer_path, sizeof(sa.sun_path));
    S.chan.fd = fd;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
        chan_up();
    } else if (errno == EINPROGRESS) {
        S.chan_state = CHAN_CONNECTING;
        chan_watch(EPOLLOUT);
    } else {
        /* ENOENT, ECONNREFUSED: peer not there yet; EAGAIN: its backlog is full. */
        close(fd);
        S.chan.fd = -1;
        S.next_retry_ms = now_ms() + RETRY_MS;
    }
}

/* Send queued handoffs until the queue is empty or the channel is full. */
static void chan_flush_queue(void)
{
    while (S.q_head) {
        struct conn *c = S.q_head;
        int e = send_conn(c);
        if (e == EAGAIN)
            return;
        S.q_head = c->next;
        if (!S.q_head)
            S.q_tail = NULL;
        c->next = NULL;
        if (e == 0) {
            close(c->it.fd);
            free(c);
        } else if (chan_dead_errno(e)) {
            logmsg("sendmsg: %s", strerror(e));
            chan_down();
            conn_drive(c);
            return;
        } else {
            logmsg("sendmsg: %s", strerror(e));
            conn_drive(c);   /* keep serving it here */
        }
    }
    chan_watch(EPOLLIN);
}

static void chan_out_event(uint32_t events)
{
    if (S.chan_state == CHAN_DOWN)   /* closed earlier in this batch */
        return;
    if (S.chan_state == CHAN_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(S.chan.fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
            err = errno;
        if (err == 0) {
            chan_up();
        } else {
            chan_watch(0);
            close(S.chan.fd);
            S.chan.fd = -1;
            S.chan_state = CHAN_DOWN;
            S.next_retry_ms = now_ms() + RETRY_MS;
        }
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
        chan_down();
        return;
    }
    if (events & EPOLLOUT)
        chan_flush_queue();
}

/* Move c to the peer, or queue it, or (channel broken) keep serving it. */
static void handoff(struct conn *c)
{
    /* Out of epoll first: the interest would outlive our close. */
    if (ep_set(&c->it, &c->watching, 0) == -1) {
        conn_close(c);
        return;
    }
    if (S.q_head) {
        S.q_tail->next = c;
        S.q_tail = c;
        return;
    }
    int e = send_conn(c);
    if (e == 0) {
        close(c->it.fd);
        free(c);
        return;
    }
    if (e == EAGAIN) {
        S.q_head = S.q_tail = c;
        chan_watch(EPOLLIN | EPOLLOUT);
        return;
    }
    logmsg("sendmsg: %s", strerror(e));
    if (chan_dead_errno(e))
        chan_down();
    conn_drive(c);
}

/* Serve c as far as possible without blocking: answer the request at the
 * head of its buffer, then hand it off (or, with no peer, go on). */
static void conn_drive(struct conn *c)
{
    for (;;) {
        if (c->out_len > 0) {
            int r = conn_flush(c);
            if (r == -1) {
                conn_close(c);
                return;
            }
            if (r == 0) {
                if (ep_set(&c->it, &c->watching, EPOLLOUT) == -1)
                    conn_close(c);
                return;
            }
            /* Answered. Move on, unless it is closed with nothing left. */
            if (S.chan_state == CHAN_UP && !(c->eof && request_size(c) == 0)) {
                handoff(c);
                return;
            }
        }
        size_t need = request_size(c);
        if (need == 0) {
            if (c->eof || ep_set(&c->it, &c->watching, EPOLLIN) == -1)
                conn_close(c);
            return;
        }
        memcpy(c->out, S.resp, S.resp_len);
        c->out_len = S.resp_len;
        c->len -= need;
        memmove(c->buf, c->buf + need, c->len);
    }
}

static void conn_event(struct conn *c)
{
    if (c->out_len == 0) {
        ssize_t n;
        do
            n = read(c->it.fd, c->buf + c->len, BUF_SIZE - c->len);
        while (n == -1 && errno == EINTR);
        if (n > 0) {
            c->len += (size_t)n;
        } else if (n == 0) {
            c->eof = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else {
            conn_close(c);   /* ECONNRESET and the like */
            return;
        }
    }
    conn_drive(c);
}

/* ---- inbound channels: adopt connections from the peer ---- */

static void chan_in_close(struct item *ch)
{
    epoll_ctl(S.ep, EPOLL_CTL_DEL, ch->fd, NULL);
    close(ch->fd);
    free(ch);
}

static void chan_in_event(struct item *ch)
{
    for (int i = 0; i < RECV_BURST; i++) {
        unsigned char data[HDR_LEN + BUF_SIZE];
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = { .iov_base = data, .iov_len = sizeof(data) };
        struct msghdr msg = {
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = ctl.buf,
            .msg_controllen = sizeof(ctl.buf),
        };
        ssize_t n = recvmsg(ch->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            logmsg("recvmsg: %s", strerror(errno));
            chan_in_close(ch);
            return;
        }
        if (n == 0) {   /* the peer closed its channel */
            chan_in_close(ch);
            return;
        }

        int fd = -1, extra = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            size_t nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t k = 0; k < nfds; k++) {
                int got;
                memcpy(&got, CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
                if (fd == -1) {
                    fd = got;
                } else {
                    close(got);
                    extra = 1;
                }
            }
        }
        if (msg.msg_flags & MSG_CTRUNC) {
            /* The fd was dropped (EMFILE?): that client is lost, the channel is fine. */
            logmsg("recvmsg: control data truncated, connection lost");
            if (fd != -1)
                close(fd);
            continue;
        }
        uint32_t hdr = 0;
        if (n >= HDR_LEN)
            memcpy(&hdr, data, HDR_LEN);
        if (fd == -1 || extra || (msg.msg_flags & MSG_TRUNC) || n < HDR_LEN ||
            hdr > BUF_SIZE || (size_t)n != HDR_LEN + hdr) {
            logmsg("bad handoff message (%zd bytes), closing that channel", n);
            if (fd != -1)
                close(fd);
            chan_in_close(ch);
            return;
        }
        struct conn *c = conn_new(fd);
        if (!c)
            continue;
        memcpy(c->buf, data + HDR_LEN, hdr);
        c->len = hdr;
        conn_drive(c);
    }
}

/* ---- listeners ---- */

static void tcp_accept(void)
{
    for (;;) {
        int fd = accept4(S.tcp.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd == -1) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                logmsg("accept4: %s", strerror(errno));
            return;
        }
        int one = 1;
        /* Two servers write in turn; Nagle would hold each reply for an ACK. */
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == -1)
            logmsg("setsockopt TCP_NODELAY: %s", strerror(errno));
        struct conn *c = conn_new(fd);
        if (c)
            conn_drive(c);
    }
}

static void unix_accept(void)
{
    for (;;) {
        int fd = accept4(S.unx.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd == -1) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                logmsg("accept4: %s", strerror(errno));
            return;
        }
        struct ucred cred;
        socklen_t len = sizeof(cred);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1) {
            logmsg("getsockopt SO_PEERCRED: %s", strerror(errno));
            close(fd);
            continue;
        }
        if (cred.uid != geteuid()) {
            logmsg("channel from uid %u refused", (unsigned)cred.uid);
            close(fd);
            continue;
        }
        struct item *ch = malloc(sizeof(*ch));
        if (!ch) {
            logmsg("malloc: %s", strerror(errno));
            close(fd);
            continue;
        }
        ch->kind = K_CHAN_IN;
        ch->fd = fd;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = ch };
        if (epoll_ctl(S.ep, EPOLL_CTL_ADD, fd, &ev) == -1) {
            logmsg("epoll_ctl: %s", strerror(errno));
            close(fd);
            free(ch);
        }
    }
}

static void listen_tcp(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        die("socket: %s", strerror(errno));
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1)
        die("setsockopt SO_REUSEADDR: %s", strerror(errno));
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1)
        die("bind 127.0.0.1:%d: %s", port, strerror(errno));
    if (listen(fd, 1024) == -1)
        die("listen: %s", strerror(errno));
    S.tcp.kind = K_TCP_LISTEN;
    S.tcp.fd = fd;
}

static void listen_unix(void)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        die("socket: %s", strerror(errno));
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, S.sock_path, sizeof(sa.sun_path));
    if (unlink(S.sock_path) == -1 && errno != ENOENT)
        die("unlink %s: %s", S.sock_path, strerror(errno));
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1)
        die("bind %s: %s", S.sock_path, strerror(errno));
    S.sock_bound = 1;
    if (listen(fd, 128) == -1)
        die("listen: %s", strerror(errno));
    S.unx.kind = K_UNIX_LISTEN;
    S.unx.fd = fd;
}

static void watch_fixed(struct item *it)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = it };
    if (epoll_ctl(S.ep, EPOLL_CTL_ADD, it->fd, &ev) == -1)
        die("epoll_ctl: %s", strerror(errno));
}

static int parse_port(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > 65535)
        return -1;
    return (int)v;
}

int main(int argc, char **argv)
{
    int peer_port;
    if (argc != 4 || (S.port = parse_port(argv[1])) == -1 ||
        (peer_port = parse_port(argv[2])) == -1) {
        fprintf(stderr, "usage: pair_epoll PORT PEER_PORT DIR\n");
        return 2;
    }
    const char *dir = argv[3];
    if (mkdir(dir, 0700) == -1 && errno != EEXIST)
        die("mkdir %s: %s", dir, strerror(errno));
    int n1 = snprintf(S.sock_path, sizeof(S.sock_path), "%s/%d.sock", dir, S.port);
    int n2 = snprintf(S.peer_path, sizeof(S.peer_path), "%s/%d.sock", dir, peer_port);
    if (n1 < 0 || n2 < 0 || (size_t)n1 >= sizeof(S.sock_path) ||
        (size_t)n2 >= sizeof(S.peer_path))
        die("socket path under %s too long", dir);
    S.resp_len = (size_t)snprintf(S.resp, sizeof(S.resp), "rsp from port: %d\n", S.port);

    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) == -1)
        die("sigprocmask: %s", strerror(errno));
    S.sig.kind = K_SIGNAL;
    S.sig.fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (S.sig.fd == -1)
        die("signalfd: %s", strerror(errno));

    S.ep = epoll_create1(EPOLL_CLOEXEC);
    if (S.ep == -1)
        die("epoll_create1: %s", strerror(errno));
    listen_tcp(S.port);
    listen_unix();
    watch_fixed(&S.sig);
    watch_fixed(&S.tcp);
    watch_fixed(&S.unx);
    S.chan.kind = K_CHAN_OUT;
    S.chan.fd = -1;
    S.chan_state = CHAN_DOWN;
    printf("ready\n");
    fflush(stdout);
    chan_connect();

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int timeout = -1;
        if (S.chan_state == CHAN_DOWN) {
            uint64_t now = now_ms();
            if (now >= S.next_retry_ms) {
                chan_connect();
                now = now_ms();
            }
            if (S.chan_state == CHAN_DOWN)
                timeout = S.next_retry_ms > now ? (int)(S.next_retry_ms - now) : 0;
        }
        int n = epoll_wait(S.ep, evs, MAX_EVENTS, timeout);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            struct item *it = evs[i].data.ptr;
            switch (it->kind) {
            case K_CONN:
                conn_event((struct conn *)it);
                break;
            case K_CHAN_IN:
                chan_in_event(it);
                break;
            case K_CHAN_OUT:
                chan_out_event(evs[i].events);
                break;
            case K_TCP_LISTEN:
                tcp_accept();
                break;
            case K_UNIX_LISTEN:
                unix_accept();
                break;
            case K_SIGNAL:
                unlink(S.sock_path);
                return 0;
            }
        }
    }
}
