/*
 * cclient.c - load generator and checker for handoff's pair mode.
 *
 *   cclient unary|stream PORT|unix:PATH [CONNS] [REQUESTS]   (defaults: 100 1000)
 *
 * Opens CONNS connections, one thread each: TCP to 127.0.0.1:PORT, or with
 * unix:PATH to the Unix stream socket PATH (a server's --listen unix:PATH).
 *   unary:  send one request, wait for its response line, send the next;
 *           latency = send -> full response line.
 *   stream: build all REQUESTS requests, write them in one write, then read
 *           every response; a connection is given up after 5 s without a
 *           byte. latency = start of the write -> arrival of that response.
 * A request is 1 length byte (16) and 16 payload bytes. A response must be
 * exactly "rsp from port: <digits>\n".
 *
 * Checks. Two servers answer in turn, so on each connection the port must
 * change from one response to the next. If exactly two ports are seen and
 * they differ only in the lowest bit, the check is the seed's
 * (port ^ last) == 1, shown as check=xor(P,Q); otherwise it is strict
 * alternation between the first two ports seen (port != last, and no third
 * port), shown as check=alternate(P,Q) ("-" for a missing port).
 *
 * Output: one line on stdout,
 *   MODE conns=C requests=R ok=N errors=E breaks=B check=... secs=S rps=X
 *   p50_us=L p99_us=L
 * ok counts well-formed responses; errors counts requests that got no
 * well-formed response (bad line, connect/write/read failure, timeout), so
 * ok + errors == conns * requests; breaks counts responses that failed the
 * alternation check. Diagnostics (the first few) go to stderr.
 * Exit status: 0 if every response is good and no break, 1 otherwise,
 * 2 on a usage error.
 *
 * Build: cc -O2 -std=c11 -D_GNU_SOURCE -pthread -o cclient cclient.c
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>

#define DEFAULT_CONNS 100
#define DEFAULT_REQUESTS 1000
#define MAX_CONNS 10000
#define MAX_REQUESTS 10000000
#define PAYLOAD_LEN 16
#define REQ_LEN (1 + PAYLOAD_LEN)
#define IDLE_TIMEOUT_SEC 5
#define MAX_LINE 64     /* longer than any valid response line */
#define MAX_DIAG 10     /* diagnostics printed before going quiet */
#define RESP_PREFIX "rsp from port: "

enum mode { UNARY, STREAM };

struct conn {
    int index;
    pthread_t tid;
    int *ports;          /* port of each good response, in order */
    uint64_t *lat_ns;    /* latency of each good response */
    long nok;            /* good responses */
};

/* Buffered line reader over a blocking socket with SO_RCVTIMEO set. */
struct reader {
    int fd;
    char buf[4096];
    size_t start, end;
    uint64_t last_read_ns;   /* when the last read() returned data */
};

enum { LINE_OK = 0, LINE_EOF = -1, LINE_ERR = -2, LINE_TIMEOUT = -3, LINE_LONG = -4 };

static enum mode g_mode;
static int g_port;              /* TCP port, or 0 with g_unix */
static struct sockaddr_un g_unix; /* unix:PATH (sun_path empty: TCP) */
static socklen_t g_unix_len;
static long g_conns = DEFAULT_CONNS;
static long g_requests = DEFAULT_REQUESTS;

/* Start gate: threads connect, then wait so the clock starts when all are in. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cond = PTHREAD_COND_INITIALIZER;
static long g_arrived;
static int g_go;
static int g_ndiag;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Print a diagnostic for connection `index` (-1: none), only the first few. */
static void diag(int index, const char *fmt, ...)
{
    pthread_mutex_lock(&g_lock);
    int n = g_ndiag++;
    pthread_mutex_unlock(&g_lock);
    if (n > MAX_DIAG)
        return;
    if (n == MAX_DIAG) {
        fprintf(stderr, "cclient: further errors not shown\n");
        return;
    }
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (index >= 0)
        fprintf(stderr, "cclient: conn %d: %s\n", index, msg);
    else
        fprintf(stderr, "cclient: %s\n", msg);
}

/* anet-style connect to 127.0.0.1:g_port, or to g_unix when set: returns
 * a connected fd, or -1 with `err` filled in. */
static int client_connect(char *err, size_t errlen)
{
    int is_unix = g_unix.sun_path[0] != '\0';
    int fd = socket(is_unix ? AF_UNIX : AF_INET, SOCK_STREAM, 0);
    if (fd == -1) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    if (!is_unix && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == -1) {
        snprintf(err, errlen, "setsockopt TCP_NODELAY: %s", strerror(errno));
        goto error;
    }
    struct timeval tv = { .tv_sec = IDLE_TIMEOUT_SEC, .tv_usec = 0 };
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == -1) {
        snprintf(err, errlen, "setsockopt SO_RCVTIMEO: %s", strerror(errno));
        goto error;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) == -1) {
        snprintf(err, errlen, "setsockopt SO_SNDTIMEO: %s", strerror(errno));
        goto error;
    }
    /* With SO_SNDTIMEO set, a Unix connect to a full backlog gives up
     * after IDLE_TIMEOUT_SEC too. */
    if (is_unix) {
        if (connect(fd, (struct sockaddr *)&g_unix, g_unix_len) == -1) {
            snprintf(err, errlen, "connect unix:%s: %s", g_unix.sun_path, strerror(errno));
            goto error;
        }
        return fd;
    }
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)g_port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1) {
        snprintf(err, errlen, "connect: %s", strerror(errno));
        goto error;
    }
    return fd;
error:
    close(fd);
    return -1;
}

/* Write all of buf; returns 0, or -1 with errno set (EAGAIN: timed out). */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Next line (with its '\n') from r: *line points into r->buf, valid until
 * the next call. Returns LINE_OK or a negative LINE_* code. */
static int read_line(struct reader *r, const char **line, size_t *len)
{
    for (;;) {
        char *nl = memchr(r->buf + r->start, '\n', r->end - r->start);
        if (nl) {
            *line = r->buf + r->start;
            *len = (size_t)(nl - *line) + 1;
            r->start += *len;
            return LINE_OK;
        }
        if (r->end - r->start >= MAX_LINE)
            return LINE_LONG;
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->end - r->start);
            r->end -= r->start;
            r->start = 0;
        }
        ssize_t n = read(r->fd, r->buf + r->end, sizeof(r->buf) - r->end);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? LINE_TIMEOUT : LINE_ERR;
        }
        if (n == 0)
            return LINE_EOF;
        r->end += (size_t)n;
        r->last_read_ns = now_ns();
    }
}

/* Parse "rsp from port: <digits>\n"; returns the port or -1. */
static int parse_response(const char *line, size_t len)
{
    size_t plen = sizeof(RESP_PREFIX) - 1;
    if (len < plen + 2 || len > plen + 6 || memcmp(line, RESP_PREFIX, plen) != 0 ||
        line[len - 1] != '\n')
        return -1;
    int port = 0;
    for (size_t i = plen; i < len - 1; i++) {
        if (line[i] < '0' || line[i] > '9')
            return -1;
        port = port * 10 + (line[i] - '0');
    }
    return (port >= 1 && port <= 65535) ? port : -1;
}

/* Read one response line and record it. Returns 0, or -1 if the connection
 * must be given up. */
static int take_response(struct conn *c, struct reader *r, uint64_t t0)
{
    const char *line;
    size_t len;
    int rc = read_line(r, &line, &len);
    switch (rc) {
    case LINE_OK:
        break;
    case LINE_EOF:
        diag(c->index, "connection closed after %ld responses", c->nok);
        return -1;
    case LINE_TIMEOUT:
        diag(c->index, "read: no data for %d s after %ld responses", IDLE_TIMEOUT_SEC, c->nok);
        return -1;
    case LINE_LONG:
        diag(c->index, "response line longer than %d bytes", MAX_LINE);
        return -1;
    default:
        diag(c->index, "read: %s", strerror(errno));
        return -1;
    }
    int port = parse_response(line, len);
    if (port == -1) {
        diag(c->index, "bad response: \"%.*s\"", (int)(len - 1), line);
        return 0;
    }
    c->ports[c->nok] = port;
    c->lat_ns[c->nok] = r->last_read_ns - t0;
    c->nok++;
    return 0;
}

static void run_unary(struct conn *c, struct reader *r)
{
    char req[REQ_LEN];
    req[0] = PAYLOAD_LEN;
    memset(req + 1, 'x', PAYLOAD_LEN);
    for (long i = 0; i < g_requests; i++) {
        uint64_t t0 = now_ns();
        if (write_all(r->fd, req, sizeof(req)) == -1) {
            diag(c->index, "write: %s", strerror(errno));
            return;
        }
        if (take_response(c, r, t0) == -1)
            return;
    }
}

static void run_stream(struct conn *c, struct reader *r)
{
    size_t total = (size_t)g_requests * REQ_LEN;
    char *buf = malloc(total);
    if (!buf) {
        diag(c->index, "malloc: %s", strerror(errno));
        return;
    }
    for (long i = 0; i < g_requests; i++) {
        char *req = buf + (size_t)i * REQ_LEN;
        req[0] = PAYLOAD_LEN;
        memset(req + 1, 'a' + (int)(i % 26), PAYLOAD_LEN);
    }
    uint64_t t0 = now_ns();
    int rc = write_all(r->fd, buf, total);
    int saved = errno;
    free(buf);
    if (rc == -1) {
        diag(c->index, "write: %s", strerror(saved));
        return;
    }
    for (long i = 0; i < g_requests; i++)
        if (take_response(c, r, t0) == -1)
            return;
}

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    char err[256];
    int fd = client_connect(err, sizeof(err));
    if (fd == -1)
        diag(c->index, "%s", err);

    pthread_mutex_lock(&g_lock);
    g_arrived++;
    pthread_cond_broadcast(&g_cond);
    while (!g_go)
        pthread_cond_wait(&g_cond, &g_lock);
    pthread_mutex_unlock(&g_lock);

    if (fd == -1)
        return NULL;
    struct reader *r = calloc(1, sizeof(*r));
    if (!r) {
        diag(c->index, "calloc: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    r->fd = fd;
    if (g_mode == UNARY)
        run_unary(c, r);
    else
        run_stream(c, r);
    free(r);
    close(fd);
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v[0..n), in microseconds. */
static uint64_t percentile_us(const uint64_t *v, size_t n, unsigned pct)
{
    if (n == 0)
        return 0;
    size_t rank = (n * pct + 99) / 100;
    if (rank < 1)
        rank = 1;
    return v[rank - 1] / 1000;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: cclient unary|stream PORT|unix:PATH [CONNS] [REQUESTS]\n"
            "  connects to 127.0.0.1:PORT, or to the Unix stream socket PATH\n"
            "  (at most %zu bytes); CONNS 1..%d (default %d), REQUESTS 1..%d (default %d)\n",
            sizeof(g_unix.sun_path) - 1, MAX_CONNS, DEFAULT_CONNS, MAX_REQUESTS, DEFAULT_REQUESTS);
    exit(2);
}

static long parse_num(const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
        usage();
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 5)
        usage();
    if (strcmp(argv[1], "unary") == 0)
        g_mode = UNARY;
    else if (strcmp(argv[1], "stream") == 0)
        g_mode = STREAM;
    else
        usage();
    if (strncmp(argv[2], "unix:", 5) == 0) {
        const char *path = argv[2] + 5;
        size_t len = strlen(path);
        if (len == 0 || len >= sizeof(g_unix.sun_path))
            usage();
        g_unix.sun_family = AF_UNIX;
        memcpy(g_unix.sun_path, path, len + 1);
        g_unix_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
    } else {
        g_port = (int)parse_num(argv[2], 1, 65535);
    }
    if (argc > 3)
        g_conns = parse_num(argv[3], 1, MAX_CONNS);
    if (argc > 4)
        g_requests = parse_num(argv[4], 1, MAX_REQUESTS);

    signal(SIGPIPE, SIG_IGN);

    struct conn *conns = calloc((size_t)g_conns, sizeof(*conns));
    if (!conns) {
        fprintf(stderr, "cclient: calloc: %s\n", strerror(errno));
        return 1;
    }
    for (long i = 0; i < g_conns; i++) {
        conns[i].index = (int)i;
        conns[i].ports = malloc((size_t)g_requests * sizeof(int));
        conns[i].lat_ns = malloc((size_t)g_requests * sizeof(uint64_t));
        if (!conns[i].ports || !conns[i].lat_ns) {
            fprintf(stderr, "cclient: malloc: %s\n", strerror(errno));
            return 1;
        }
    }

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    char *started = calloc((size_t)g_conns, 1);
    if (!started) {
        fprintf(stderr, "cclient: calloc: %s\n", strerror(errno));
        return 1;
    }
    long nstarted = 0;
    for (long i = 0; i < g_conns; i++) {
        int rc = pthread_create(&conns[i].tid, &attr, conn_main, &conns[i]);
        if (rc != 0) {
            diag((int)i, "pthread_create: %s", strerror(rc));
            continue;
        }
        started[i] = 1;
        nstarted++;
    }
    pthread_attr_destroy(&attr);

    /* Start the clock once every connection is set up. */
    pthread_mutex_lock(&g_lock);
    while (g_arrived < nstarted)
        pthread_cond_wait(&g_cond, &g_lock);
    uint64_t t_start = now_ns();
    g_go = 1;
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_lock);

    for (long i = 0; i < g_conns; i++)
        if (started[i])
            pthread_join(conns[i].tid, NULL);
    uint64_t t_end = now_ns();
    free(started);

    /* The first two distinct ports seen decide which check applies. */
    int pa = 0, pb = 0, more = 0;
    long ok = 0;
    for (long i = 0; i < g_conns; i++) {
        ok += conns[i].nok;
        for (long j = 0; j < conns[i].nok; j++) {
            int p = conns[i].ports[j];
            if (pa == 0)
                pa = p;
            else if (p != pa && pb == 0)
                pb = p;
            else if (p != pa && p != pb)
                more = 1;
        }
    }
    if (pb != 0 && pb < pa) {
        int t = pa;
        pa = pb;
        pb = t;
    }
    int use_xor = pa != 0 && pb != 0 && !more && (pa ^ pb) == 1;
    char check[64];
    if (pa == 0)
        snprintf(check, sizeof(check), "none");
    else if (use_xor)
        snprintf(check, sizeof(check), "xor(%d,%d)", pa, pb);
    else if (pb == 0)
        snprintf(check, sizeof(check), "alternate(%d,-)", pa);
    else
        snprintf(check, sizeof(check), "alternate(%d,%d)", pa, pb);

    long breaks = 0;
    for (long i = 0; i < g_conns; i++) {
        const int *ports = conns[i].ports;
        for (long j = 0; j < conns[i].nok; j++) {
            int p = ports[j], last = j > 0 ? ports[j - 1] : 0;
            int bad;
            if (use_xor)
                bad = j > 0 && (p ^ last) != 1;
            else
                bad = (p != pa && p != pb) || (j > 0 && p == last);
            if (bad) {
                breaks++;
                diag((int)i, "break at response %ld: port %d after %d (check %s)", j, p, last,
                     check);
            }
        }
    }

    /* Latency percentiles over every good response. */
    uint64_t *all = malloc((size_t)(ok > 0 ? ok : 1) * sizeof(uint64_t));
    if (!all) {
        fprintf(stderr, "cclient: malloc: %s\n", strerror(errno));
        return 1;
    }
    size_t n = 0;
    for (long i = 0; i < g_conns; i++) {
        memcpy(all + n, conns[i].lat_ns, (size_t)conns[i].nok * sizeof(uint64_t));
        n += (size_t)conns[i].nok;
    }
    qsort(all, n, sizeof(uint64_t), cmp_u64);

    long expected = g_conns * g_requests;
    long errors = expected - ok;
    double secs = (double)(t_end - t_start) / 1e9;
    double rps = secs > 0 ? (double)ok / secs : 0;
    printf("%s conns=%ld requests=%ld ok=%ld errors=%ld breaks=%ld check=%s secs=%.3f "
           "rps=%.0f p50_us=%llu p99_us=%llu\n",
           g_mode == UNARY ? "unary" : "stream", g_conns, g_requests, ok, errors, breaks, check,
           secs, rps, (unsigned long long)percentile_us(all, n, 50),
           (unsigned long long)percentile_us(all, n, 99));
    fflush(stdout);

    free(all);
    for (long i = 0; i < g_conns; i++) {
        free(conns[i].ports);
        free(conns[i].lat_ns);
    }
    free(conns);
    return (errors == 0 && breaks == 0 && ok == expected) ? 0 : 1;
}
