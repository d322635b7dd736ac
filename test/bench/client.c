/*
 * A minimal vfio-user client for the benchmarks (test/bench/run.ts builds it
 * with `cc -O2` into a temp dir at bench time). Blocking AF_UNIX socket,
 * one buffered reader per connection, no allocation in the timed loops.
 *
 * It serves the server's DMA_READ / DMA_WRITE requests whenever it waits
 * for a reply, as QEMU does, so a device may DMA over the socket.
 *
 * Every mode prints one JSON object on stdout (and "ready" lines where a
 * mode synchronises with run.ts over stdin/stdout). Errors go to stderr and
 * exit with status 1.
 *
 *   [--at REGION:OFFSET] MODE ...
 *                               where lat, posted and the fence access (default
 *                               0:0x04, edu's BAR0 liveness register;
 *                               libvfio-user's sample server: 1:0, BAR1)
 *   lat SOCK OP N WARM [sync]   OP = read | write | echo: N timed round trips
 *                               of a 4-byte REGION_READ/WRITE at --at, or for
 *                               `echo` a 16+16-byte message the Node echo
 *                               server returns as it is.
 *                               `sync`: print "ready" after the warm-up and
 *                               wait for a stdin line before the timed loop.
 *   posted SOCK N BATCH         N REGION_WRITEs with NO_REPLY (BATCH per
 *                               sendmsg), then one REGION_READ as a fence.
 *   migread SOCK CHUNK [LIMIT]  VERSION, MIG_DEVICE_STATE := STOP_COPY, then
 *                               MIG_DATA_READ(CHUNK) until an empty reply (or
 *                               LIMIT bytes: the echo server's raw mode).
 *   migrw SRC DST CHUNK         SRC: STOP, timed STOP->STOP_COPY, MIG_DATA_READ
 *                               (CHUNK) to an empty reply into memory, timed
 *                               STOP_COPY->STOP, RUNNING; then DST: STOP, timed
 *                               STOP->RESUMING, the same chunks as
 *                               MIG_DATA_WRITEs, timed RESUMING->STOP, RUNNING.
 *                               Read and write times exclude the client's
 *                               copy into its buffer. SRC may equal DST (the
 *                               C echo: the connections are sequential).
 *   downtime SRC DST CHUNK PERMILLE
 *                               pre-copy from SRC into DST (RESUMING), dirty
 *                               PERMILLE/1000 of BAR2's pages, converge, then
 *                               time STOP_COPY -> read to end -> DST STOP ->
 *                               DST RUNNING.
 *   dmalog SOCK GIB REPS        DMA_MAP a sparse GIB GiB memfd, LOGGING_START
 *                               at 4 KiB; then per stdin line "report" one
 *                               timed DMA_LOGGING_REPORT over all of it; also
 *                               times a memcpy of the same bitmap size.
 *   fill SOCK REGION MIB SEED   writes a non-zero pattern over the first MIB
 *                               MiB of a region in 1 MiB REGION_WRITEs (so
 *                               device memory is real memory, not zero pages).
 *   dma SOCK MODE MIB REPS      MODE = mmap | socket: bigmem's DMA engine
 *                               copies MIB MiB of device memory into guest
 *                               memory, REPS times (after one warm-up each way).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- protocol constants (spec: docs/interop/vfio-user.rst) ---- */
enum {
  CMD_VERSION = 1,
  CMD_DMA_MAP = 2,
  CMD_REGION_READ = 9,
  CMD_REGION_WRITE = 10,
  CMD_DMA_READ = 11,
  CMD_DMA_WRITE = 12,
  CMD_DEVICE_FEATURE = 16,
  CMD_MIG_DATA_READ = 17,
  CMD_MIG_DATA_WRITE = 18,
};
#define F_REPLY 0x1u
#define F_NO_REPLY 0x10u
#define F_ERROR 0x20u
#define FEAT_GET (1u << 16)
#define FEAT_SET (1u << 17)
enum { FEAT_MIG_DEVICE_STATE = 2, FEAT_LOG_START = 6, FEAT_LOG_REPORT = 8 };
enum { MIG_STOP = 1, MIG_RUNNING = 2, MIG_STOP_COPY = 3, MIG_RESUMING = 4, MIG_PRE_COPY = 6 };
enum { REGION_BAR0 = 0, REGION_BAR2 = 2, REGION_CONFIG = 7 };

/* where lat, posted and fence() access: --at REGION:OFFSET */
static uint32_t at_region = REGION_BAR0;
static uint64_t at_offset = 0x04;

#define HDR 16
#define RBUF_CAP (8u << 20)

typedef struct {
  uint16_t id, cmd;
  uint32_t size, flags, error;
} hdr_t;

typedef struct {
  int fd;
  uint8_t *buf;
  size_t start, end;
  uint16_t next_id;
  /* socket DMA: guest memory the client serves DMA_READ/WRITE from */
  uint8_t *guest;
  uint64_t guest_iova, guest_size;
  uint64_t dma_msgs;
  /* set while connecting: EOF or a refused connect jumps back to retry */
  jmp_buf *retry;
} conn_t;

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "bench-client: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(1);
}

static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int conn_connect(conn_t *c, const char *path) {
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof(a.sun_path)) die("socket path too long");
  strcpy(a.sun_path, path);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die("socket: %s", strerror(errno));
  if (connect(c->fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
    int e = errno;
    close(c->fd);
    if (e == ECONNREFUSED || e == ENOENT || e == EAGAIN) return -1;
    die("connect %s: %s", path, strerror(e));
  }
  c->start = c->end = 0;
  c->next_id = 1;
  return 0;
}

static void fill_hdr(uint8_t *h, uint16_t id, uint16_t cmd, uint32_t size, uint32_t flags, uint32_t err) {
  put16(h, id);
  put16(h + 2, cmd);
  put32(h + 4, size);
  put32(h + 8, flags);
  put32(h + 12, err);
}

/* sendmsg of all iovecs (header included by the caller), fd optional. */
static void send_all(conn_t *c, struct iovec *iov, int n, int fd) {
  char ctl[CMSG_SPACE(sizeof(int))];
  struct msghdr m = {0};
  m.msg_iov = iov;
  m.msg_iovlen = n;
  if (fd >= 0) {
    memset(ctl, 0, sizeof(ctl));
    m.msg_control = ctl;
    m.msg_controllen = sizeof(ctl);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  }
  while (m.msg_iovlen > 0) {
    ssize_t r = sendmsg(c->fd, &m, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("sendmsg: %s", strerror(errno));
    }
    m.msg_control = NULL;
    m.msg_controllen = 0;
    while (m.msg_iovlen > 0 && (size_t)r >= m.msg_iov[0].iov_len) {
      r -= (ssize_t)m.msg_iov[0].iov_len;
      m.msg_iov++;
      m.msg_iovlen--;
    }
    if (m.msg_iovlen > 0) {
      m.msg_iov[0].iov_base = (uint8_t *)m.msg_iov[0].iov_base + r;
      m.msg_iov[0].iov_len -= (size_t)r;
    }
  }
}

/* Sends a command: header + body parts. Returns the msg id. */
static uint16_t send_cmd(conn_t *c, uint16_t cmd, uint32_t flags, const void *b1, size_t l1, const void *b2,
                         size_t l2, int fd) {
  uint8_t h[HDR];
  uint16_t id = c->next_id++;
  fill_hdr(h, id, cmd, (uint32_t)(HDR + l1 + l2), flags, 0);
  struct iovec iov[3] = {{h, HDR}, {(void *)b1, l1}, {(void *)b2, l2}};
  send_all(c, iov, l2 ? 3 : (l1 ? 2 : 1), fd);
  return id;
}

/* Makes sure `need` bytes are buffered. */
static void fill(conn_t *c, size_t need) {
  if (c->end - c->start >= need) return;
  if (need > RBUF_CAP) die("message of %zu bytes exceeds the client's buffer", need);
  if (c->start + need > RBUF_CAP) {
    memmove(c->buf, c->buf + c->start, c->end - c->start);
    c->end -= c->start;
    c->start = 0;
  }
  while (c->end - c->start < need) {
    ssize_t r = recv(c->fd, c->buf + c->end, RBUF_CAP - c->end, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("recv: %s", strerror(errno));
    }
    if (r == 0) {
      if (c->retry) longjmp(*c->retry, 1);
      die("server closed the connection");
    }
    c->end += (size_t)r;
  }
}

/* Next whole message; body valid until the next call. */
static const uint8_t *next_msg(conn_t *c, hdr_t *h) {
  fill(c, HDR);
  const uint8_t *p = c->buf + c->start;
  memcpy(&h->id, p, 2);
  memcpy(&h->cmd, p + 2, 2);
  h->size = get32(p + 4);
  h->flags = get32(p + 8);
  h->error = get32(p + 12);
  if (h->size < HDR) die("bad message size %u", h->size);
  fill(c, h->size);
  p = c->buf + c->start;
  c->start += h->size;
  if (c->start == c->end) c->start = c->end = 0;
  return p + HDR;
}

/* Serves a DMA request from the server (socket DMA). */
static void serve_dma(conn_t *c, const hdr_t *h, const uint8_t *body) {
  uint8_t rh[HDR];
  c->dma_msgs++;
  if (h->size - HDR < 16) die("short DMA request");
  uint64_t addr = get64(body), count = get64(body + 8);
  int ok = c->guest && addr >= c->guest_iova && count <= c->guest_size && addr - c->guest_iova <= c->guest_size - count;
  if (h->cmd == CMD_DMA_WRITE) {
    if (ok && h->size - HDR - 16 == count) memcpy(c->guest + (addr - c->guest_iova), body + 16, count);
    fill_hdr(rh, h->id, h->cmd, HDR, F_REPLY | (ok ? 0 : F_ERROR), ok ? 0 : 14);
    struct iovec iov[1] = {{rh, HDR}};
    send_all(c, iov, 1, -1);
  } else {
    uint8_t fixed[16];
    memcpy(fixed, body, 16);
    fill_hdr(rh, h->id, h->cmd, (uint32_t)(ok ? HDR + 16 + count : HDR), F_REPLY | (ok ? 0 : F_ERROR), ok ? 0 : 14);
    struct iovec iov[3] = {{rh, HDR}, {fixed, 16}, {ok ? c->guest + (addr - c->guest_iova) : NULL, ok ? count : 0}};
    send_all(c, iov, ok ? 3 : 1, -1);
  }
}

/* Waits for the reply to `id`, serving DMA requests meanwhile. Dies on an error reply. */
static const uint8_t *wait_reply(conn_t *c, uint16_t id, hdr_t *h) {
  for (;;) {
    const uint8_t *body = next_msg(c, h);
    if ((h->flags & 0xf) == 0) {
      if (h->cmd == CMD_DMA_READ || h->cmd == CMD_DMA_WRITE) {
        serve_dma(c, h, body);
        continue;
      }
      die("unexpected command %u from the server", h->cmd);
    }
    if (h->id != id) die("reply to msg %u while waiting for %u", h->id, id);
    if (h->flags & F_ERROR) die("command %u failed: errno %u", h->cmd, h->error);
    return body;
  }
}

/* Round trips made through call(), for the downtime breakdown. */
static uint64_t calls;

static const uint8_t *call(conn_t *c, uint16_t cmd, const void *b1, size_t l1, const void *b2, size_t l2, int fd,
                           hdr_t *h) {
  uint16_t id = send_cmd(c, cmd, 0, b1, l1, b2, l2, fd);
  calls++;
  return wait_reply(c, id, h);
}

static void version(conn_t *c) {
  static const char json[] = "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576}}";
  uint8_t body[4 + sizeof(json)];
  put16(body, 0);
  put16(body + 2, 0);
  memcpy(body + 4, json, sizeof(json)); /* with its NUL */
  hdr_t h;
  call(c, CMD_VERSION, body, sizeof(body), NULL, 0, -1, &h);
}

/*
 * Connects and negotiates VERSION. The server serves one client at a time
 * and may not have seen the previous client's EOF yet: a refused or closed
 * connection is retried for up to 5 s.
 */
static void conn_open(conn_t *c, const char *path) {
  memset(c, 0, sizeof(*c));
  c->buf = malloc(RBUF_CAP);
  if (!c->buf) die("out of memory");
  static jmp_buf env;
  volatile int tries = 0;
  if (setjmp(env)) {
    close(c->fd);
    usleep(10000);
  }
  for (;;) {
    if (++tries > 500) die("cannot connect to %s", path);
    if (conn_connect(c, path) == 0) break;
    usleep(10000);
  }
  c->retry = &env;
  version(c);
  c->retry = NULL;
}

static uint32_t region_read32(conn_t *c, uint32_t region, uint64_t off) {
  uint8_t b[16];
  put64(b, off);
  put32(b + 8, region);
  put32(b + 12, 4);
  hdr_t h;
  const uint8_t *r = call(c, CMD_REGION_READ, b, 16, NULL, 0, -1, &h);
  if (h.size != HDR + 20) die("REGION_READ reply of %u bytes", h.size);
  return get32(r + 16);
}

static void region_write(conn_t *c, uint32_t region, uint64_t off, const void *data, uint32_t n) {
  uint8_t b[16];
  put64(b, off);
  put32(b + 8, region);
  put32(b + 12, n);
  hdr_t h;
  call(c, CMD_REGION_WRITE, b, 16, data, n, -1, &h);
}

static void region_write64(conn_t *c, uint32_t region, uint64_t off, uint64_t v) {
  region_write(c, region, off, &v, 8);
}

static void region_write32(conn_t *c, uint32_t region, uint64_t off, uint32_t v) {
  region_write(c, region, off, &v, 4);
}

/* DEVICE_FEATURE SET MIG_DEVICE_STATE. */
static void set_state(conn_t *c, uint32_t state) {
  uint8_t b[16];
  put32(b, 16);
  put32(b + 4, FEAT_MIG_DEVICE_STATE | FEAT_SET);
  put32(b + 8, state);
  put32(b + 12, (uint32_t)-1);
  hdr_t h;
  const uint8_t *r = call(c, CMD_DEVICE_FEATURE, b, 16, NULL, 0, -1, &h);
  if (h.size < HDR + 16 || get32(r + 8) != state) die("state %u not reached", state);
}

/* DEVICE_FEATURE GET MIG_DEVICE_STATE. */
static uint32_t get_state(conn_t *c) {
  uint8_t b[16];
  put32(b, 16);
  put32(b + 4, FEAT_MIG_DEVICE_STATE | FEAT_GET);
  put32(b + 8, 0);
  put32(b + 12, 0);
  hdr_t h;
  const uint8_t *r = call(c, CMD_DEVICE_FEATURE, b, 16, NULL, 0, -1, &h);
  if (h.size < HDR + 12) die("short MIG_DEVICE_STATE reply");
  return get32(r + 8);
}

/* One MIG_DATA_READ; returns the data size, *data points into the read buffer. */
static uint32_t mig_read(conn_t *c, uint32_t chunk, const uint8_t **data) {
  uint8_t b[8];
  put32(b, 8 + chunk);
  put32(b + 4, chunk);
  hdr_t h;
  const uint8_t *r = call(c, CMD_MIG_DATA_READ, b, 8, NULL, 0, -1, &h);
  if (h.size < HDR + 8) die("short MIG_DATA_READ reply");
  uint32_t n = get32(r + 4);
  /* libvfio-user's reply is as long as the request asked, its size field says how much of it is data */
  if (n > h.size - HDR - 8) die("MIG_DATA_READ reply size %u exceeds its %u data bytes", n, h.size - HDR - 8);
  *data = r + 8;
  return n;
}

static void mig_write(conn_t *c, const uint8_t *data, uint32_t n) {
  uint8_t b[8];
  put32(b, 8 + n);
  put32(b + 4, n);
  hdr_t h;
  call(c, CMD_MIG_DATA_WRITE, b, 8, data, n, -1, &h);
}

/* A REGION_READ whose reply only orders the stream (any reply size: the echo server echoes it). */
static void fence(conn_t *c) {
  uint8_t b[16];
  put64(b, at_offset);
  put32(b + 8, at_region);
  put32(b + 12, 4);
  hdr_t h;
  call(c, CMD_REGION_READ, b, 16, NULL, 0, -1, &h);
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static void wait_stdin_line(void) {
  char line[256];
  if (!fgets(line, sizeof(line), stdin)) die("stdin closed");
}

/* At the end of a synchronised mode: a line or EOF, either lets us exit. */
static void wait_stdin_end(void) {
  char line[256];
  if (!fgets(line, sizeof(line), stdin)) return;
}

/* ---- modes ---- */

static int mode_lat(const char *sock, const char *op, long n, long warm, int sync) {
  conn_t c;
  conn_open(&c, sock);
  int is_read = strcmp(op, "read") == 0, is_write = strcmp(op, "write") == 0, is_echo = strcmp(op, "echo") == 0;
  if (!is_read && !is_write && !is_echo) die("op must be read, write or echo");
  /* Request bytes prepared once; only the msg id changes. */
  uint8_t req[HDR + 16 + 4];
  uint32_t reqlen = is_write ? HDR + 20 : HDR + 16;
  fill_hdr(req, 0, is_write ? CMD_REGION_WRITE : CMD_REGION_READ, reqlen, 0, 0);
  put64(req + HDR, at_offset);
  put32(req + HDR + 8, at_region);
  put32(req + HDR + 12, is_echo ? 16 : 4);
  put32(req + HDR + 16, 0x12345678);
  uint32_t want = is_read ? HDR + 20 : HDR + 16;
  uint64_t *t = malloc(sizeof(uint64_t) * (size_t)n);
  if (!t) die("out of memory");
  for (long i = -warm; i < n; i++) {
    if (i == 0 && sync) {
      printf("ready\n");
      fflush(stdout);
      wait_stdin_line();
    }
    uint16_t id = c.next_id++;
    put16(req, id);
    uint64_t t0 = now_ns();
    struct iovec iov = {req, reqlen};
    send_all(&c, &iov, 1, -1);
    hdr_t h;
    wait_reply(&c, id, &h);
    uint64_t t1 = now_ns();
    if (h.size != want) die("reply of %u bytes, expected %u", h.size, want);
    if (i >= 0) t[i] = t1 - t0;
  }
  uint64_t sum = 0;
  for (long i = 0; i < n; i++) sum += t[i];
  qsort(t, (size_t)n, sizeof(uint64_t), cmp_u64);
  printf("{\"n\":%ld,\"median_ns\":%llu,\"p99_ns\":%llu,\"mean_ns\":%llu,\"min_ns\":%llu}\n", n,
         (unsigned long long)t[n / 2], (unsigned long long)t[(size_t)((double)n * 0.99)],
         (unsigned long long)(sum / (uint64_t)n), (unsigned long long)t[0]);
  fflush(stdout);
  if (sync) wait_stdin_end();
  return 0;
}

static int mode_posted(const char *sock, long n, int batch, int sync) {
  conn_t c;
  conn_open(&c, sock);
  if (batch < 1 || batch > 1024) die("batch must be 1..1024");
  const uint32_t len = HDR + 20;
  uint8_t *msgs = malloc((size_t)len * (size_t)batch);
  struct iovec iov = {msgs, 0};
  for (int k = 0; k < batch; k++) {
    uint8_t *m = msgs + (size_t)k * len;
    fill_hdr(m, 0, CMD_REGION_WRITE, len, F_NO_REPLY, 0);
    put64(m + HDR, at_offset);
    put32(m + HDR + 8, at_region);
    put32(m + HDR + 12, 4);
    put32(m + HDR + 16, (uint32_t)k);
  }
  /* warm-up: a few thousand posted writes and a fence */
  for (long done = 0; done < 5000; done += batch) {
    for (int k = 0; k < batch; k++) put16(msgs + (size_t)k * len, c.next_id++);
    iov.iov_base = msgs;
    iov.iov_len = (size_t)len * (size_t)batch;
    send_all(&c, &iov, 1, -1);
  }
  fence(&c);
  if (sync) {
    printf("ready\n");
    fflush(stdout);
    wait_stdin_line();
  }
  uint64_t t0 = now_ns();
  for (long done = 0; done < n;) {
    int k = (int)(n - done < batch ? n - done : batch);
    for (int j = 0; j < k; j++) put16(msgs + (size_t)j * len, c.next_id++);
    iov.iov_base = msgs;
    iov.iov_len = (size_t)len * (size_t)k;
    send_all(&c, &iov, 1, -1);
    done += k;
  }
  fence(&c); /* replies come in order: every posted write is done */
  uint64_t t1 = now_ns();
  printf("{\"n\":%ld,\"ns\":%llu,\"msgs_per_s\":%.0f}\n", n, (unsigned long long)(t1 - t0),
         (double)n * 1e9 / (double)(t1 - t0));
  fflush(stdout);
  if (sync) wait_stdin_end();
  return 0;
}

static int mode_migread(const char *sock, uint32_t chunk, uint64_t limit) {
  conn_t c;
  conn_open(&c, sock);
  if (!limit) set_state(&c, MIG_STOP_COPY);
  uint64_t total = 0, msgs = 0;
  uint64_t t0 = now_ns();
  for (;;) {
    uint32_t want = chunk;
    if (limit && limit - total < want) want = (uint32_t)(limit - total);
    const uint8_t *data;
    uint32_t n = mig_read(&c, want, &data);
    total += n;
    msgs++;
    if (n == 0 || (limit && total >= limit)) break;
  }
  uint64_t t1 = now_ns();
  if (!limit) set_state(&c, MIG_STOP);
  printf("{\"bytes\":%llu,\"msgs\":%llu,\"ns\":%llu,\"gbps\":%.3f}\n", (unsigned long long)total,
         (unsigned long long)msgs, (unsigned long long)(t1 - t0), (double)total / (double)(t1 - t0));
  return 0;
}

static uint64_t timed_state(conn_t *c, uint32_t state) {
  uint64_t t0 = now_ns();
  set_state(c, state);
  return now_ns() - t0;
}

static int mode_migrw(const char *srcp, const char *dstp, uint32_t chunk) {
  const size_t cap = (size_t)4 << 30; /* address space only: pages are touched as data arrives */
  uint8_t *store = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (store == MAP_FAILED) die("mmap: %s", strerror(errno));
  uint32_t *lens = malloc(sizeof(uint32_t) * (cap / 4096));
  if (!lens) die("out of memory");
  conn_t src, dst;
  conn_open(&src, srcp);
  if (get_state(&src) != MIG_STOP) set_state(&src, MIG_STOP);
  uint64_t to_stop_copy = timed_state(&src, MIG_STOP_COPY);
  uint64_t total = 0, nchunks = 0, read_ns = 0;
  for (;;) {
    const uint8_t *data;
    uint64_t t0 = now_ns();
    uint32_t n = mig_read(&src, chunk, &data);
    read_ns += now_ns() - t0;
    if (n == 0) break;
    if (total + n > cap || nchunks == cap / 4096) die("migration stream larger than %zu bytes", cap);
    memcpy(store + total, data, n);
    lens[nchunks++] = n;
    total += n;
  }
  uint64_t stop_copy_to_stop = timed_state(&src, MIG_STOP);
  set_state(&src, MIG_RUNNING);
  close(src.fd);
  free(src.buf);
  conn_open(&dst, dstp);
  /*
   * libvfio-user reads a message body with one recv() without MSG_WAITALL
   * (tran_sock.c): a 1 MiB MIG_DATA_WRITE it wakes up for before all of it
   * is queued is a "short read" and the connection is lost. A send buffer
   * that holds a whole message lets sendmsg queue all of it in one call;
   * run.ts also pins client and server to one CPU for this mode.
   */
  int sndbuf = 4 << 20;
  if (setsockopt(dst.fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
    setsockopt(dst.fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
  if (get_state(&dst) != MIG_STOP) set_state(&dst, MIG_STOP);
  uint64_t to_resuming = timed_state(&dst, MIG_RESUMING);
  uint64_t write_ns = 0, at = 0;
  for (uint64_t i = 0; i < nchunks; i++) {
    uint64_t t0 = now_ns();
    mig_write(&dst, store + at, lens[i]);
    write_ns += now_ns() - t0;
    at += lens[i];
  }
  uint64_t resuming_to_stop = timed_state(&dst, MIG_STOP);
  set_state(&dst, MIG_RUNNING);
  close(dst.fd);
  printf("{\"bytes\":%llu,\"chunks\":%llu,\"read_ns\":%llu,\"write_ns\":%llu,\"read_gbps\":%.3f,\"write_gbps\":%.3f,"
         "\"stop_to_stop_copy_ns\":%llu,\"stop_copy_to_stop_ns\":%llu,\"stop_to_resuming_ns\":%llu,"
         "\"resuming_to_stop_ns\":%llu}\n",
         (unsigned long long)total, (unsigned long long)nchunks, (unsigned long long)read_ns,
         (unsigned long long)write_ns, (double)total / (double)read_ns, (double)total / (double)write_ns,
         (unsigned long long)to_stop_copy, (unsigned long long)stop_copy_to_stop, (unsigned long long)to_resuming,
         (unsigned long long)resuming_to_stop);
  return 0;
}

/* Reads from src until a reply shorter than chunk, writing each piece to dst. */
static uint64_t pump(conn_t *src, conn_t *dst, uint32_t chunk, int until_empty, uint64_t *msgs) {
  uint64_t total = 0;
  for (;;) {
    const uint8_t *data;
    uint32_t n = mig_read(src, chunk, &data);
    (*msgs)++;
    if (n > 0) mig_write(dst, data, n);
    total += n;
    if (until_empty ? n == 0 : n < chunk) return total;
  }
}

static int mode_downtime(const char *srcp, const char *dstp, uint32_t chunk, long permille) {
  conn_t src, dst;
  conn_open(&src, srcp);
  conn_open(&dst, dstp);
  /* BAR2 size from bigmem's MEM_SIZE register */
  uint64_t mem = region_read32(&src, REGION_BAR0, 0x08) | ((uint64_t)region_read32(&src, REGION_BAR0, 0x0c) << 32);
  uint64_t pages = mem / 4096, msgs = 0;
  set_state(&dst, MIG_RESUMING);
  uint64_t t0 = now_ns();
  set_state(&src, MIG_PRE_COPY);
  uint64_t first = pump(&src, &dst, chunk, 0, &msgs);
  uint64_t t1 = now_ns();
  /* dirty permille/1000 of the pages, spread evenly, with posted writes and a fence */
  long ndirty = (long)(pages * (uint64_t)permille / 1000);
  uint8_t rec[HDR + 20];
  for (long i = 0; i < ndirty; i++) {
    uint64_t page = (uint64_t)i * pages / (uint64_t)ndirty;
    fill_hdr(rec, src.next_id++, CMD_REGION_WRITE, HDR + 20, F_NO_REPLY, 0);
    put64(rec + HDR, page * 4096 + 8);
    put32(rec + HDR + 8, REGION_BAR2);
    put32(rec + HDR + 12, 4);
    put32(rec + HDR + 16, 0xd1d1d1d1u ^ (uint32_t)i);
    struct iovec iov = {rec, sizeof(rec)};
    send_all(&src, &iov, 1, -1);
  }
  region_read32(&src, REGION_BAR0, 0x00);
  uint64_t second = pump(&src, &dst, chunk, 0, &msgs);
  uint64_t third = pump(&src, &dst, chunk, 0, &msgs); /* converged: nothing new */
  /* --- downtime --- */
  uint64_t d0 = now_ns(), calls0 = calls;
  set_state(&src, MIG_STOP_COPY);
  uint64_t d1 = now_ns();
  uint64_t stopcopy = pump(&src, &dst, chunk, 1, &msgs);
  uint64_t d2 = now_ns();
  set_state(&dst, MIG_STOP);
  uint64_t d3 = now_ns();
  set_state(&dst, MIG_RUNNING);
  uint64_t d4 = now_ns(), downtime_rts = calls - calls0;
  set_state(&src, MIG_STOP);
  /* the destination has the dirtied word */
  uint32_t got = region_read32(&dst, REGION_BAR2, (uint64_t)(ndirty - 1) * pages / (uint64_t)ndirty * 4096 + 8);
  int ok = ndirty == 0 || got == (0xd1d1d1d1u ^ (uint32_t)(ndirty - 1));
  printf("{\"pages\":%llu,\"dirtied\":%ld,\"precopy_bytes\":%llu,\"precopy_ms\":%.3f,\"second_bytes\":%llu,"
         "\"third_bytes\":%llu,\"stopcopy_bytes\":%llu,\"msgs\":%llu,\"set_stop_copy_ms\":%.3f,\"drain_ms\":%.3f,"
         "\"dst_stop_ms\":%.3f,\"dst_running_ms\":%.3f,\"downtime_ms\":%.3f,\"downtime_rts\":%llu,\"verified\":%s}\n",
         (unsigned long long)pages, ndirty, (unsigned long long)first, (double)(t1 - t0) / 1e6,
         (unsigned long long)second, (unsigned long long)third, (unsigned long long)stopcopy,
         (unsigned long long)msgs, (double)(d1 - d0) / 1e6, (double)(d2 - d1) / 1e6, (double)(d3 - d2) / 1e6,
         (double)(d4 - d3) / 1e6, (double)(d4 - d0) / 1e6, (unsigned long long)downtime_rts, ok ? "true" : "false");
  return ok ? 0 : 1;
}

static int mode_dmalog(const char *sock, long gib, long reps) {
  conn_t c;
  conn_open(&c, sock);
  uint64_t size = (uint64_t)gib << 30;
  int mfd = memfd_create("bench-guest", MFD_CLOEXEC);
  if (mfd < 0 || ftruncate(mfd, (off_t)size) < 0) die("memfd: %s", strerror(errno));
  uint8_t map[32];
  put32(map, 32);
  put32(map + 4, 3);
  put64(map + 8, 0);
  put64(map + 16, 0);
  put64(map + 24, size);
  hdr_t h;
  call(&c, CMD_DMA_MAP, map, 32, NULL, 0, mfd, &h);
  close(mfd);
  uint8_t start[8 + 16 + 16];
  put32(start, sizeof(start));
  put32(start + 4, FEAT_LOG_START | FEAT_SET);
  put64(start + 8, 4096);
  put32(start + 16, 1);
  put32(start + 20, 0);
  put64(start + 24, 0);
  put64(start + 32, size);
  call(&c, CMD_DEVICE_FEATURE, start, sizeof(start), NULL, 0, -1, &h);
  uint64_t bitmap = size / 4096 / 8;
  /* memcpy baseline: the same bitmap size, warm buffers, median of 51 */
  uint8_t *a = malloc(bitmap), *b = malloc(bitmap);
  memset(a, 0x5a, bitmap);
  memset(b, 0, bitmap);
  uint64_t mt[51];
  for (int i = 0; i < 51; i++) {
    a[i] ^= 1;
    uint64_t t0 = now_ns();
    memcpy(b, a, bitmap);
    __asm__ volatile("" ::"r"(b) : "memory");
    mt[i] = now_ns() - t0;
  }
  qsort(mt, 51, sizeof(uint64_t), cmp_u64);
  printf("{\"ready\":true,\"bitmap_bytes\":%llu,\"memcpy_ns\":%llu}\n", (unsigned long long)bitmap,
         (unsigned long long)mt[25]);
  fflush(stdout);
  uint8_t rep[8 + 24];
  put32(rep, (uint32_t)(8 + 24 + bitmap));
  put32(rep + 4, FEAT_LOG_REPORT | FEAT_GET);
  put64(rep + 8, 0);
  put64(rep + 16, size);
  put64(rep + 24, 4096);
  for (long r = 0; r < reps; r++) {
    wait_stdin_line();
    uint64_t t0 = now_ns();
    const uint8_t *body = call(&c, CMD_DEVICE_FEATURE, rep, sizeof(rep), NULL, 0, -1, &h);
    uint64_t t1 = now_ns();
    if (h.size != HDR + 32 + bitmap) die("REPORT reply of %u bytes", h.size);
    uint64_t dirty = 0;
    const uint8_t *bm = body + 32;
    for (uint64_t i = 0; i + 8 <= bitmap; i += 8) dirty += (uint64_t)__builtin_popcountll(get64(bm + i));
    printf("{\"report_ns\":%llu,\"dirty_pages\":%llu}\n", (unsigned long long)(t1 - t0), (unsigned long long)dirty);
    fflush(stdout);
  }
  return 0;
}

static int mode_dma(const char *sock, const char *mode, long mib, long reps) {
  conn_t c;
  conn_open(&c, sock);
  int use_fd = strcmp(mode, "mmap") == 0;
  if (!use_fd && strcmp(mode, "socket") != 0) die("mode must be mmap or socket");
  uint64_t size = (uint64_t)mib << 20, iova = 1ull << 32;
  uint8_t map[32];
  put32(map, 32);
  put32(map + 4, 3);
  put64(map + 8, 0);
  put64(map + 16, iova);
  put64(map + 24, size);
  hdr_t h;
  int mfd = -1;
  if (use_fd) {
    mfd = memfd_create("bench-guest", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, (off_t)size) < 0) die("memfd: %s", strerror(errno));
  } else {
    c.guest = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c.guest == MAP_FAILED) die("mmap: %s", strerror(errno));
    memset(c.guest, 0x33, size);
    c.guest_iova = iova;
    c.guest_size = size;
  }
  call(&c, CMD_DMA_MAP, map, 32, NULL, 0, mfd, &h);
  if (mfd >= 0) close(mfd);
  /* PCI command: memory space + bus master */
  uint16_t cmdreg = 0x6;
  region_write(&c, REGION_CONFIG, 4, &cmdreg, 2);
  uint64_t times[64];
  if (reps > 64) reps = 64;
  /* warm-up: guest -> device (touches device memory), then device -> guest */
  for (long r = -2; r < reps; r++) {
    uint32_t dir = r == -2 ? 0 : 2; /* bit1: device memory -> guest RAM */
    region_write64(&c, REGION_BAR0, 0x40, iova);
    region_write64(&c, REGION_BAR0, 0x48, 0);
    region_write64(&c, REGION_BAR0, 0x50, size);
    uint32_t gen0 = region_read32(&c, REGION_BAR0, 0x14);
    uint64_t t0 = now_ns();
    region_write32(&c, REGION_BAR0, 0x58, 1 | dir);
    uint32_t st;
    do st = region_read32(&c, REGION_BAR0, 0x10);
    while (st & 1);
    uint64_t t1 = now_ns();
    if (st & 2) die("DMA error (status 0x%x)", st);
    if (region_read32(&c, REGION_BAR0, 0x14) != gen0 + 1) die("DMA did not complete");
    if (r >= 0) times[r] = t1 - t0;
  }
  qsort(times, (size_t)reps, sizeof(uint64_t), cmp_u64);
  printf("{\"bytes\":%llu,\"median_ns\":%llu,\"best_ns\":%llu,\"gbps\":%.3f,\"dma_msgs\":%llu}\n",
         (unsigned long long)size, (unsigned long long)times[reps / 2], (unsigned long long)times[0],
         (double)size / (double)times[reps / 2], (unsigned long long)c.dma_msgs);
  return 0;
}

static int mode_fill(const char *sock, uint32_t region, long mib, uint32_t seed) {
  conn_t c;
  conn_open(&c, sock);
  const uint32_t chunk = 1u << 20;
  uint32_t *buf = malloc(chunk);
  if (!buf) die("out of memory");
  uint64_t t0 = now_ns();
  for (long m = 0; m < mib; m++) {
    uint32_t x = seed * 2654435761u + (uint32_t)m * 40503u + 1;
    for (uint32_t i = 0; i < chunk / 4; i++) {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      buf[i] = x;
    }
    region_write(&c, region, (uint64_t)m << 20, buf, chunk);
  }
  uint64_t t1 = now_ns();
  printf("{\"bytes\":%llu,\"ns\":%llu}\n", (unsigned long long)((uint64_t)mib << 20), (unsigned long long)(t1 - t0));
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc > 2 && !strcmp(argv[1], "--at")) {
    char *end;
    at_region = (uint32_t)strtoul(argv[2], &end, 0);
    if (*end != ':') die("--at wants REGION:OFFSET");
    at_offset = strtoull(end + 1, NULL, 0);
    argv += 2;
    argc -= 2;
  }
  if (argc < 2) die("usage: see the comment at the top of client.c");
  const char *m = argv[1];
  if (!strcmp(m, "lat") && argc >= 6)
    return mode_lat(argv[2], argv[3], atol(argv[4]), atol(argv[5]), argc > 6 && !strcmp(argv[6], "sync"));
  if (!strcmp(m, "posted") && argc >= 5)
    return mode_posted(argv[2], atol(argv[3]), atoi(argv[4]), argc > 5 && !strcmp(argv[5], "sync"));
  if (!strcmp(m, "migread") && argc >= 4)
    return mode_migread(argv[2], (uint32_t)atol(argv[3]), argc > 4 ? (uint64_t)atoll(argv[4]) : 0);
  if (!strcmp(m, "migrw") && argc >= 5) return mode_migrw(argv[2], argv[3], (uint32_t)atol(argv[4]));
  if (!strcmp(m, "downtime") && argc >= 6)
    return mode_downtime(argv[2], argv[3], (uint32_t)atol(argv[4]), atol(argv[5]));
  if (!strcmp(m, "dmalog") && argc >= 5) return mode_dmalog(argv[2], atol(argv[3]), atol(argv[4]));
  if (!strcmp(m, "fill") && argc >= 6)
    return mode_fill(argv[2], (uint32_t)atol(argv[3]), atol(argv[4]), (uint32_t)atol(argv[5]));
  if (!strcmp(m, "dma") && argc >= 6) return mode_dma(argv[2], argv[3], atol(argv[4]), atol(argv[5]));
  die("bad arguments for mode %s", m);
  return 1;
}
