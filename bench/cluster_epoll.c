/*
 * cluster_epoll.c - the C yardstick for handoff's cluster mode: a parent
 * and WORKERS forked workers, each one thread on epoll, no libraries.
 *
 *   cluster_epoll PORT [WORKERS]        (WORKERS: default 2)
 *
 * The parent binds WORKERS listening sockets on TCP 127.0.0.1:PORT with
 * SO_REUSEPORT (the kernel spreads new connections over them by their
 * addresses), forks one worker per socket, prints "ready port=PORT
 * workers=N" on stdout and waits. SIGINT/SIGTERM to the parent stops the
 * workers and exits 0; a worker dies with its parent (PR_SET_PDEATHSIG).
 *
 * Protocol: the one handoff's rpc service speaks on the hot path. A frame
 * is a u32 little-endian length and that many bytes of JSON. A request
 * {"in":"ping","params":X} is answered {"out":"pong","result":X}, X copied
 * as text (whatever follows "params": up to the closing brace); anything
 * else gets {"out":"error","result":"unsupported"}. Frames above 1 MiB
 * close the connection. Pipelined requests are answered in order; replies
 * that do not fit the socket wait for EPOLLOUT.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define MAX_EVENTS 256
#define MAX_FRAME (1u << 20)
#define READ_CHUNK 16384
#define MAX_WORKERS 64

struct conn {
    int fd;
    uint32_t watching;            /* events registered with epoll */
    unsigned char *in;            /* unparsed input */
    size_t in_len, in_cap;
    unsigned char *out;           /* replies not yet sent */
    size_t out_off, out_len, out_cap;
};

static int listen_fd = -1;        /* the worker's own marker for epoll */
static int ep = -1;
static int worker_index;

static void fail(const char *what)
{
    fprintf(stderr, "cluster_epoll: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Grows *buf to hold at least need bytes; 0 or -1 (out of memory). */
static int reserve(unsigned char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 256;
    while (c < need)
        c *= 2;
    unsigned char *n = realloc(*buf, c);
    if (!n)
        return -1;
    *buf = n;
    *cap = c;
    return 0;
}

static void conn_close(struct conn *c)
{
    close(c->fd);             /* also leaves epoll: nobody else holds it */
    free(c->in);
    free(c->out);
    free(c);
}

static int append(struct conn *c, const void *p, size_t n)
{
    if (reserve(&c->out, &c->out_cap, c->out_len + n) < 0)
        return -1;
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    return 0;
}

/* Answers one request body. 0 or -1 (out of memory). */
static int answer(struct conn *c, const unsigned char *body, size_t len)
{
    static const char ping[] = "{\"in\":\"ping\"";
    static const char key[] = "\"params\":";
    static const char pong[] = "{\"out\":\"pong\",\"result\":";
    static const char err[] = "{\"out\":\"error\",\"result\":\"unsupported\"}";
    const unsigned char *x = NULL;
    size_t xlen = 0;
    if (len > sizeof(ping) && memcmp(body, ping, sizeof(ping) - 1) == 0) {
        const unsigned char *k = memmem(body, len, key, sizeof(key) - 1);
        while (len > 0 && body[len - 1] != '}')
            len--;
        if (k && len > 0 && k + sizeof(key) - 1 < body + len - 1) {
            x = k + sizeof(key) - 1;
            xlen = (size_t)(body + len - 1 - x);
        }
    }
    uint32_t n = x ? (uint32_t)(sizeof(pong) - 1 + xlen + 1) : (uint32_t)(sizeof(err) - 1);
    unsigned char hdr[4] = { n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, n >> 24 };
    if (append(c, hdr, 4) < 0)
        return -1;
    if (!x)
        return append(c, err, sizeof(err) - 1);
    if (append(c, pong, sizeof(pong) - 1) < 0 || append(c, x, xlen) < 0)
        return -1;
    return append(c, "}", 1);
}

/* Sends what is queued: 1 all sent, 0 would block, -1 dead. */
static int flush(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? 0 : -1;
        }
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
    return 1;
}

static int watch(struct conn *c, uint32_t want)
{
    if (c->watching == want)
        return 0;
    struct epoll_event ev = { .events = want, .data.ptr = c };
    if (epoll_ctl(ep, c->watching ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return -1;
    c->watching = want;
    return 0;
}

/* Reads what is there, answers every whole frame, sends. -1: close it. */
static int drive(struct conn *c, int readable)
{
    while (readable) {
        if (reserve(&c->in, &c->in_cap, c->in_len + READ_CHUNK) < 0)
            return -1;
        ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (n == 0)
            return -1;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            return -1;
        }
        c->in_len += (size_t)n;
        if ((size_t)n < c->in_cap - (c->in_len - (size_t)n))
            break;            /* short read: the socket is empty */
    }
    size_t off = 0;
    while (c->in_len - off >= 4) {
        const unsigned char *h = c->in + off;
        uint32_t len = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
        if (len > MAX_FRAME)
            return -1;
        if (c->in_len - off < 4 + (size_t)len)
            break;
        if (answer(c, h + 4, len) < 0)
            return -1;
        off += 4 + (size_t)len;
    }
    if (off) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
    int f = flush(c);
    if (f < 0)
        return -1;
    return watch(c, f ? EPOLLIN : EPOLLIN | EPOLLOUT);
}

static void accept_all(void)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                fprintf(stderr, "cluster_epoll worker %d: accept: %s\n", worker_index, strerror(errno));
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct conn *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        if (watch(c, EPOLLIN) < 0)
            conn_close(c);
    }
}

static void worker(int fd, int index)
{
    worker_index = index;
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    listen_fd = fd;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        fail("epoll_create1");
    struct epoll_event lev = { .events = EPOLLIN, .data.ptr = NULL };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &lev) < 0)
        fail("epoll_ctl listener");
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                accept_all();
                continue;
            }
            uint32_t e = evs[i].events;
            if (drive(c, (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0) < 0)
                conn_close(c);
        }
    }
}

static volatile sig_atomic_t stop;
static void on_stop(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: cluster_epoll PORT [WORKERS]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int workers = argc > 2 ? atoi(argv[2]) : 2;
    if (port <= 0 || port > 65535 || workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "cluster_epoll: PORT 1..65535, WORKERS 1..%d\n", MAX_WORKERS);
        return 2;
    }
    int fds[MAX_WORKERS];
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < workers; i++) {
        int one = 1;
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fds[i] < 0)
            fail("socket");
        if (setsockopt(fds[i], SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0 ||
            setsockopt(fds[i], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
            fail("setsockopt");
        if (bind(fds[i], (struct sockaddr *)&a, sizeof(a)) < 0)
            fail("bind");
        if (listen(fds[i], 4096) < 0)
            fail("listen");
    }
    struct sigaction sa = { .sa_handler = on_stop };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    pid_t pids[MAX_WORKERS];
    for (int i = 0; i < workers; i++) {
        pids[i] = fork();
        if (pids[i] < 0)
            fail("fork");
        if (pids[i] == 0) {
            for (int j = 0; j < workers; j++)
                if (j != i)
                    close(fds[j]);
            worker(fds[i], i);
            _exit(0);
        }
    }
    for (int i = 0; i < workers; i++)
        close(fds[i]);
    printf("ready port=%d workers=%d\n", port, workers);
    fflush(stdout);
    while (!stop) {
        int st;
        pid_t p = wait(&st);
        if (p < 0 && errno != EINTR)
            break;
        if (p > 0 && !stop) {
            fprintf(stderr, "cluster_epoll: worker pid %d exited; stopping\n", (int)p);
            break;
        }
    }
    for (int i = 0; i < workers; i++)
        kill(pids[i], SIGTERM);
    while (wait(NULL) > 0)
        ;
    return 0;
}
