/*
 * cfloor.c -- the C floor of malla's benchmark harness (bench/README.md).
 *
 * What a request/response RPC over loopback TCP costs on this machine when
 * nothing but the kernel and a few lines of C stand in the way: C99 and
 * POSIX sockets on epoll, no library.  Like bench/floor.py it is fixed and
 * deliberately plain -- neither a strawman nor tuned:
 *
 *   frame   a 4-byte big-endian length, then that many bytes of payload.
 *           A request's payload is the argument, a reply's the result.
 *   server  echo.  One read of what the socket has; every complete frame
 *           in the buffer gets its reply (the same length and bytes)
 *           appended to an output buffer; the replies of that read leave
 *           with one write.  The partial frame left is moved to the front
 *           of the buffer once per read.
 *   client  one connection, N requests outstanding (N = concurrency).
 *           Each request is written at once, one write per call (header and
 *           payload in one sendmsg, from the caller's buffer).  Replies
 *           come back in order on the one connection, so they are matched
 *           first in, first out; every reply is compared byte for byte with
 *           the payload, and a mismatch ends the client with an error.
 *           Every call is timed with clock_gettime(CLOCK_MONOTONIC) from
 *           just before its write to just after its reply was checked.
 *
 * Both ends: non-blocking sockets, TCP_NODELAY, level-triggered epoll,
 * 127.0.0.1 only; the server binds port 0 and reports the port it got.
 * They talk to the harness as bench.worker does (bench/procs.py): JSON
 * event lines on stdout, command words on stdin ("go", "rss"), and they
 * exit at once when stdin reaches EOF (the parent is done or gone).  The
 * client's measurement is bench/measure.py's async_load: one checked call,
 * a warm-up round that is not recorded, "ready", then after "go" the timed
 * round, bounded by a call count and a time limit, whichever comes first.
 *
 *   cfloor serve
 *   cfloor client PORT PAYLOAD_SIZE CONCURRENCY MAX_CALLS MAX_SECONDS WARMUP_CALLS
 */

#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HOST "127.0.0.1"
#define READ_CHUNK 65536u                 /* room made for each read, at least */
#define MAX_FRAME (64u * 1024u * 1024u)   /* far above any scenario's message */
#define SKETCH_POINTS 1001                /* as bench/measure.py's sketch() */
#define MAX_EVENTS 64

/* ---------------------------------------------------------------- output */

static void json_string(const char *s)
{
    fputc('"', stdout);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(stdout, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(stdout, "\\u%04x", ch);
        else
            fputc(ch, stdout);
    }
    fputc('"', stdout);
}

/* End an event line; a parent that stopped reading is a parent gone. */
static void end_line(void)
{
    fputc('\n', stdout);
    if (fflush(stdout) != 0)
        _exit(1);
}

/* Report an error the way bench.worker does, and exit. */
static void fail(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cfloor: %s\n", msg);
    fputs("{\"event\": \"error\", \"message\": ", stdout);
    json_string(msg);
    fputc('}', stdout);
    end_line();
    exit(1);
}

static void fail_errno(const char *what)
{
    fail("%s: %s", what, strerror(errno));
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------- RSS (procs.py) */

/* Peak RSS of this program's own address space (VmHWM; exec resets it). */
static long peak_rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f != NULL) {
        char line[256];
        long kib = -1;
        while (fgets(line, sizeof line, f) != NULL) {
            if (strncmp(line, "VmHWM:", 6) == 0) {
                kib = strtol(line + 6, NULL, 10);
                break;
            }
        }
        fclose(f);
        if (kib >= 0)
            return kib;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

/* RSS right now, or -1 where /proc is missing. */
static long current_rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size, resident;
    if (f == NULL)
        return -1;
    int ok = fscanf(f, "%ld %ld", &size, &resident) == 2;
    fclose(f);
    return ok ? resident * (sysconf(_SC_PAGESIZE) / 1024) : -1;
}

static void emit_rss(void)
{
    long current = current_rss_kib();
    printf("{\"event\": \"rss\", \"peak_kib\": %ld, \"current_kib\": ", peak_rss_kib());
    if (current < 0)
        fputs("null}", stdout);
    else
        printf("%ld}", current);
    end_line();
}

/* -------------------------------------------------- commands from stdin */

static char cmd_buf[256];
static size_t cmd_len;

/* Read what stdin has, answer "rss"; return how many "go"s came.  EOF:
 * the parent closed our stdin or died, so leave at once. */
static int read_commands(void)
{
    ssize_t n = read(0, cmd_buf + cmd_len, sizeof cmd_buf - 1 - cmd_len);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 0;
    if (n <= 0)
        _exit(0);
    cmd_len += (size_t)n;
    int go = 0;
    char *line = cmd_buf, *nl;
    while ((nl = memchr(line, '\n', cmd_len - (size_t)(line - cmd_buf))) != NULL) {
        char *end = nl;
        while (end > line && (end[-1] == '\r' || end[-1] == ' '))
            end--;
        *end = '\0';
        if (strcmp(line, "rss") == 0)
            emit_rss();
        else if (strcmp(line, "go") == 0)
            go++;
        line = nl + 1; /* other words (quit...) mean nothing here */
    }
    cmd_len -= (size_t)(line - cmd_buf);
    memmove(cmd_buf, line, cmd_len);
    if (cmd_len == sizeof cmd_buf - 1)
        cmd_len = 0; /* a line that long is no command: drop it */
    return go;
}

/* ------------------------------------------------------- sockets, epoll */

static int epfd = -1;
static char stdin_tag, listener_tag; /* epoll data for the non-connections */

static void watch(int op, int fd, void *ptr, uint32_t events)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.ptr = ptr;
    if (epoll_ctl(epfd, op, fd, &ev) < 0)
        fail_errno("epoll_ctl");
}

static void set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        fail_errno("fcntl(O_NONBLOCK)");
}

static void set_nodelay(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        fail_errno("setsockopt(TCP_NODELAY)");
}

static void loopback(struct sockaddr_in *addr, unsigned port)
{
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, HOST, &addr->sin_addr) != 1)
        fail("bad address %s", HOST);
}

static void setup_epoll(void)
{
    epfd = epoll_create1(0);
    if (epfd < 0)
        fail_errno("epoll_create1");
    watch(EPOLL_CTL_ADD, 0, &stdin_tag, EPOLLIN); /* a pipe from the harness */
}

/* ---------------------------------------------------------------- buffers */

struct buf {
    unsigned char *data;
    size_t head; /* first byte not yet consumed (output: not yet written) */
    size_t len;  /* end of the bytes held */
    size_t cap;
};

static void buf_reserve(struct buf *b, size_t room)
{
    if (b->cap - b->len >= room)
        return;
    size_t cap = b->cap ? b->cap : READ_CHUNK;
    while (cap - b->len < room)
        cap *= 2;
    unsigned char *p = realloc(b->data, cap);
    if (p == NULL)
        fail("out of memory (%zu bytes)", cap);
    b->data = p;
    b->cap = cap;
}

static void buf_append(struct buf *b, const void *src, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->data + b->len, src, n);
    b->len += n;
}

/* Drop the bytes before head: one move per read, as floor.py's del buf[:pos]. */
static void buf_compact(struct buf *b)
{
    if (b->head == 0)
        return;
    b->len -= b->head;
    memmove(b->data, b->data + b->head, b->len);
    b->head = 0;
}

static uint32_t get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* One read of what the socket has, into b (which starts with the partial
 * frame, if any): room for the whole of that frame, READ_CHUNK at least.
 * Returns the bytes read, 0 at EOF, -1 if there was nothing, -2 on error. */
static ssize_t read_some(int fd, struct buf *b)
{
    size_t room = READ_CHUNK;
    if (b->len - b->head >= 4) {
        size_t frame = 4 + (size_t)get_be32(b->data + b->head);
        size_t have = b->len - b->head;
        if (frame <= 4 + (size_t)MAX_FRAME && frame > have && frame - have > room)
            room = frame - have;
    }
    buf_reserve(b, room);
    ssize_t n = recv(fd, b->data + b->len, b->cap - b->len, 0);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? -1 : -2;
    b->len += (size_t)n;
    return n;
}

/* Write what b holds: 1 if all of it left, 0 if the socket is full, -1 on error. */
static int write_some(int fd, struct buf *b)
{
    while (b->head < b->len) {
        ssize_t n = send(fd, b->data + b->head, b->len - b->head, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        }
        b->head += (size_t)n;
    }
    b->head = b->len = 0;
    return 1;
}

/* ---------------------------------------------------------------- server */

struct conn {
    int fd;
    int polling_out; /* EPOLLOUT is on: replies are waiting for room */
    struct buf in, out;
};

static void conn_close(struct conn *c)
{
    close(c->fd); /* also takes it out of the epoll set */
    free(c->in.data);
    free(c->out.data);
    free(c);
}

/* Write the pending replies; 0 to keep the connection, -1 if it is gone. */
static int conn_flush(struct conn *c)
{
    int done = write_some(c->fd, &c->out);
    if (done < 0) {
        conn_close(c);
        return -1;
    }
    if (done == c->polling_out) { /* full and not polling, or drained and polling */
        c->polling_out = !done;
        watch(EPOLL_CTL_MOD, c->fd, c, EPOLLIN | (done ? 0u : (uint32_t)EPOLLOUT));
    }
    return 0;
}

/* One read; reply to every complete frame; one write for the replies. */
static int conn_readable(struct conn *c)
{
    ssize_t n = read_some(c->fd, &c->in);
    if (n == -1)
        return 0;
    if (n <= 0) { /* the client is done (or broke the connection) */
        conn_close(c);
        return -1;
    }
    struct buf *in = &c->in;
    while (in->len - in->head >= 4) {
        uint32_t size = get_be32(in->data + in->head);
        if (size > MAX_FRAME) {
            fprintf(stderr, "cfloor: a frame of %lu bytes: connection closed\n",
                    (unsigned long)size);
            conn_close(c);
            return -1;
        }
        if (in->len - in->head - 4 < size)
            break; /* the rest of this frame has not arrived yet */
        /* the method: echo.  The reply is a frame of its own, built here. */
        unsigned char header[4];
        put_be32(header, size);
        buf_append(&c->out, header, 4);
        buf_append(&c->out, in->data + in->head + 4, size);
        in->head += 4 + (size_t)size;
    }
    buf_compact(in);
    if (c->out.len > c->out.head && !c->polling_out)
        return conn_flush(c); /* one write per read's batch */
    return 0;
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            fail_errno("accept");
        }
        set_nonblocking(fd);
        set_nodelay(fd);
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL)
            fail("out of memory");
        c->fd = fd;
        watch(EPOLL_CTL_ADD, fd, c, EPOLLIN);
    }
}

static void serve(void)
{
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0)
        fail_errno("socket");
    struct sockaddr_in addr;
    loopback(&addr, 0);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        fail_errno("bind");
    if (listen(lfd, SOMAXCONN) < 0)
        fail_errno("listen");
    socklen_t len = sizeof addr;
    if (getsockname(lfd, (struct sockaddr *)&addr, &len) < 0)
        fail_errno("getsockname");
    set_nonblocking(lfd);
    setup_epoll();
    watch(EPOLL_CTL_ADD, lfd, &listener_tag, EPOLLIN);
    printf("{\"event\": \"ready\", \"port\": %u}", (unsigned)ntohs(addr.sin_port));
    end_line();

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            void *ptr = events[i].data.ptr;
            uint32_t ev = events[i].events;
            if (ptr == &stdin_tag) {
                read_commands();
            } else if (ptr == &listener_tag) {
                accept_all(lfd);
            } else {
                struct conn *c = ptr;
                int alive = 0;
                if (ev & EPOLLOUT)
                    alive = conn_flush(c);
                if (alive == 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                    conn_readable(c);
            }
        }
    }
}

/* ---------------------------------------------------------------- client */

struct client {
    int fd;
    int polling_out;
    struct buf in, out; /* out: the unwritten rest of requests, in order */
    const unsigned char *payload;
    uint32_t size;
    unsigned char header[4];
    uint64_t *sent_at; /* ring of the outstanding calls' start times, FIFO */
    unsigned slots, first, inflight;
    uint64_t replies; /* checked so far, for messages */
};

struct round {
    uint64_t budget, issued, deadline;
    uint64_t *latencies; /* NULL: not recorded (warm-up) */
    uint64_t recorded;
};

static void client_poll_out(struct client *c, int on)
{
    if (on != c->polling_out) {
        c->polling_out = on;
        watch(EPOLL_CTL_MOD, c->fd, c, EPOLLIN | (on ? (uint32_t)EPOLLOUT : 0u));
    }
}

/* Start one call: write its request at once (or queue it behind the
 * unwritten rest of earlier ones, which must leave first). */
static void issue(struct client *c, uint64_t t0)
{
    c->sent_at[(c->first + c->inflight) % c->slots] = t0;
    c->inflight++;
    size_t frame = 4 + (size_t)c->size;
    size_t sent = 0;
    if (c->out.len == c->out.head) {
        struct iovec iov[2];
        iov[0].iov_base = c->header;
        iov[0].iov_len = 4;
        iov[1].iov_base = (void *)c->payload;
        iov[1].iov_len = c->size;
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        ssize_t n;
        do
            n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            fail_errno("send");
        if (n > 0)
            sent = (size_t)n;
        if (sent == frame)
            return;
    }
    if (sent < 4) {
        buf_append(&c->out, c->header + sent, 4 - sent);
        sent = 4;
    }
    buf_append(&c->out, c->payload + (sent - 4), frame - sent);
    client_poll_out(c, 1);
}

static void client_flush(struct client *c)
{
    int done = write_some(c->fd, &c->out);
    if (done < 0)
        fail_errno("send");
    client_poll_out(c, !done);
}

/* Check and time every complete reply; start the next call in its place. */
static void take_replies(struct client *c, struct round *r)
{
    struct buf *in = &c->in;
    while (in->len - in->head >= 4) {
        uint32_t size = get_be32(in->data + in->head);
        if (c->inflight == 0)
            fail("echo mismatch: a reply with no call outstanding (after %llu replies)",
                 (unsigned long long)c->replies);
        if (size != c->size)
            fail("echo mismatch: reply %llu is %lu bytes long, the payload %lu",
                 (unsigned long long)c->replies + 1, (unsigned long)size,
                 (unsigned long)c->size);
        if (in->len - in->head - 4 < size)
            break; /* the rest of this reply has not arrived yet */
        const unsigned char *got = in->data + in->head + 4;
        if (memcmp(got, c->payload, size) != 0) {
            size_t at = 0;
            while (got[at] == c->payload[at])
                at++;
            fail("echo mismatch: reply %llu differs from the payload at byte %zu of %lu"
                 " (0x%02x, not 0x%02x)",
                 (unsigned long long)c->replies + 1, at, (unsigned long)size, got[at],
                 c->payload[at]);
        }
        in->head += 4 + (size_t)size;
        uint64_t done = now_ns();
        if (r->latencies != NULL)
            r->latencies[r->recorded++] = done - c->sent_at[c->first];
        c->first = (c->first + 1) % c->slots;
        c->inflight--;
        c->replies++;
        if (r->issued < r->budget) {
            uint64_t t0 = now_ns();
            if (t0 < r->deadline) {
                issue(c, t0);
                r->issued++;
            }
        }
    }
    buf_compact(in);
}

/* Wait for events on the connection and stdin; returns the "go"s seen. */
static int client_events(struct client *c, struct round *r)
{
    struct epoll_event events[4];
    int n = epoll_wait(epfd, events, 4, -1);
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        fail_errno("epoll_wait");
    }
    int go = 0;
    for (int i = 0; i < n; i++) {
        if (events[i].data.ptr == &stdin_tag) {
            go += read_commands();
            continue;
        }
        if (events[i].events & EPOLLOUT)
            client_flush(c);
        if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
            ssize_t got = read_some(c->fd, &c->in);
            if (got == 0)
                fail("the server closed the connection (%u calls outstanding)", c->inflight);
            if (got == -2)
                fail_errno("recv");
            if (got > 0)
                take_replies(c, r);
        }
    }
    return go;
}

/* ``budget`` calls, ``slots`` at a time, none started after ``seconds``. */
static double run_round(struct client *c, uint64_t budget, double seconds,
                        uint64_t *latencies, uint64_t *recorded)
{
    struct round r;
    memset(&r, 0, sizeof r);
    r.budget = budget;
    r.latencies = latencies;
    uint64_t start = now_ns();
    r.deadline = start + (uint64_t)(seconds * 1e9);
    while (c->inflight < c->slots && r.issued < r.budget) {
        uint64_t t0 = now_ns();
        if (t0 >= r.deadline)
            break;
        issue(c, t0);
        r.issued++;
    }
    while (c->inflight > 0)
        client_events(c, &r);
    if (recorded != NULL)
        *recorded = r.recorded;
    return (double)(now_ns() - start) / 1e9;
}

/* As bench.measure: each of the ``slots`` callers makes ceil(calls/slots). */
static uint64_t budget_of(uint64_t calls, unsigned slots)
{
    return (calls + slots - 1) / slots * slots;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static unsigned long long parse_uint(const char *text, const char *what, unsigned long long max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || v > max)
        fail("bad %s: %s", what, text);
    return v;
}

static int client(char **argv)
{
    unsigned port = (unsigned)parse_uint(argv[0], "port", 65535);
    uint32_t size = (uint32_t)parse_uint(argv[1], "payload size", MAX_FRAME);
    unsigned slots = (unsigned)parse_uint(argv[2], "concurrency", 1u << 20);
    uint64_t max_calls = parse_uint(argv[3], "max calls", 1ull << 32);
    char *end;
    double max_seconds = strtod(argv[4], &end);
    if (end == argv[4] || *end != '\0' || !(max_seconds > 0 && max_seconds < 1e6))
        fail("bad max seconds: %s", argv[4]);
    uint64_t warmup = parse_uint(argv[5], "warm-up calls", 1ull << 32);
    if (slots == 0)
        fail("concurrency must be at least 1");

    /* bench.measure.make_payload: bytes 0..255 over and over */
    unsigned char *payload = malloc(size ? size : 1);
    if (payload == NULL)
        fail("out of memory");
    for (uint32_t i = 0; i < size; i++)
        payload[i] = (unsigned char)i;

    struct client c;
    memset(&c, 0, sizeof c);
    c.payload = payload;
    c.size = size;
    put_be32(c.header, size);
    c.slots = slots;
    c.sent_at = calloc(slots, sizeof *c.sent_at);
    if (c.sent_at == NULL)
        fail("out of memory");
    c.fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c.fd < 0)
        fail_errno("socket");
    set_nodelay(c.fd);
    struct sockaddr_in addr;
    loopback(&addr, port);
    if (connect(c.fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        fail_errno("connect");
    set_nonblocking(c.fd);
    setup_epoll();
    watch(EPOLL_CTL_ADD, c.fd, &c, EPOLLIN);

    /* One checked call first, then the warm-up: the same loop, unrecorded. */
    run_round(&c, 1, max_seconds, NULL, NULL);
    uint64_t warm = warmup > slots ? warmup : slots;
    run_round(&c, budget_of(warm, slots), max_seconds, NULL, NULL);
    fputs("{\"event\": \"ready\"}", stdout);
    end_line();
    struct round idle;
    memset(&idle, 0, sizeof idle);
    while (client_events(&c, &idle) == 0) /* until "go" */
        ;

    uint64_t budget = budget_of(max_calls, slots);
    uint64_t *latencies = malloc((budget ? budget : 1) * sizeof *latencies);
    if (latencies == NULL)
        fail("out of memory");
    uint64_t calls = 0;
    double elapsed = run_round(&c, budget, max_seconds, latencies, &calls);
    close(c.fd);

    qsort(latencies, calls, sizeof *latencies, cmp_u64);
    printf("{\"event\": \"result\", \"calls\": %llu, \"elapsed_s\": %.9f, \"sketch_ns\": [",
           (unsigned long long)calls, elapsed);
    if (calls > 0) {
        uint64_t last = calls - 1;
        for (uint64_t i = 0; i < SKETCH_POINTS; i++) {
            /* round(i * last / 1000), halves to even, as Python's round() */
            uint64_t num = i * last, q = num / (SKETCH_POINTS - 1), rem = num % (SKETCH_POINTS - 1);
            if (rem * 2 > SKETCH_POINTS - 1 || (rem * 2 == SKETCH_POINTS - 1 && (q & 1)))
                q++;
            printf("%s%llu", i ? ", " : "", (unsigned long long)latencies[q]);
        }
    }
    printf("], \"peak_rss_kib\": %ld}", peak_rss_kib());
    end_line();
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a closed socket or pipe is an error code, not death */
    if (argc == 2 && strcmp(argv[1], "serve") == 0) {
        serve(); /* returns only by exiting */
        return 0;
    }
    if (argc == 8 && strcmp(argv[1], "client") == 0)
        return client(argv + 2);
    fprintf(stderr,
            "usage: cfloor serve\n"
            "       cfloor client PORT PAYLOAD_SIZE CONCURRENCY MAX_CALLS MAX_SECONDS "
            "WARMUP_CALLS\n");
    return 2;
}
