/*
 * The C echo floor for `npm run bench`: the least any vfio-user server can
 * do per request over a UNIX socket. One blocking connection at a time (it
 * accepts the next one when the client hangs up), one recv per batch of
 * requests, one sendmsg per reply, no framing library, no dispatch table,
 * no device. run.ts builds it with `cc -O2` next to client.c and drives it
 * with the same client as libvfio-user and ours.
 *
 * Each request gets a reply of the size the real command's reply has:
 *   REGION_READ     header + the 16-byte request fields + `count` bytes
 *   REGION_WRITE    header + the 16-byte request fields
 *   MIG_DATA_READ   header + argsz/size + up to `size` bytes of a 256 MiB
 *                   pattern buffer (then 0 bytes: end of stream); the
 *                   stream restarts on each connection
 *   MIG_DATA_WRITE  header only
 *   DEVICE_FEATURE  DMA_LOGGING_REPORT: the request's argsz (zero bitmap);
 *                   anything else: the request echoed (so a SET of
 *                   MIG_DEVICE_STATE reads back the state it asked for)
 *   NO_REPLY flag   nothing
 *   anything else   the request echoed
 * fds received with a message (DMA_MAP) are closed.
 *
 *   c-echo SOCKET
 *
 * Prints "listening" on stdout once the socket accepts connections.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

enum { CMD_REGION_READ = 9, CMD_REGION_WRITE = 10, CMD_DEVICE_FEATURE = 16, CMD_MIG_DATA_READ = 17, CMD_MIG_DATA_WRITE = 18 };
#define F_REPLY 0x1u
#define F_NO_REPLY 0x10u
#define FEAT_LOG_REPORT 8u
#define HDR 16
#define BUF_CAP (4u << 20)
#define ZERO_CAP (8u << 20)
#define MIG_SIZE (256u << 20)

static uint8_t *zeros, *mig;

static uint32_t get32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static int send_iov(int fd, struct iovec *iov, int n) {
  struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
  while (m.msg_iovlen > 0) {
    ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
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
  return 0;
}

/* Answers one whole message at p (its header's size bytes). */
static int answer(int fd, uint8_t *p, uint32_t size, uint64_t *mig_at) {
  uint32_t flags = get32(p + 8);
  if (flags & F_NO_REPLY) return 0;
  uint16_t cmd;
  memcpy(&cmd, p + 2, 2);
  uint8_t h[HDR + 8];
  memcpy(h, p, HDR);
  put32(h + 8, (flags & ~0xfu) | F_REPLY);
  put32(h + 12, 0);
  struct iovec iov[3] = {{h, HDR}, {NULL, 0}, {NULL, 0}};
  int n = 1;
  uint32_t body = size - HDR;
  if (cmd == CMD_REGION_READ && body >= 16) {
    uint32_t count = get32(p + HDR + 12);
    if (count > ZERO_CAP) count = ZERO_CAP;
    iov[1] = (struct iovec){p + HDR, 16};
    iov[2] = (struct iovec){zeros, count};
    n = 3;
    put32(h + 4, HDR + 16 + count);
  } else if (cmd == CMD_REGION_WRITE && body >= 16) {
    iov[1] = (struct iovec){p + HDR, 16};
    n = 2;
    put32(h + 4, HDR + 16);
  } else if (cmd == CMD_MIG_DATA_READ && body >= 8) {
    uint64_t want = get32(p + HDR + 4), left = MIG_SIZE - *mig_at;
    uint32_t k = (uint32_t)(want < left ? want : left);
    put32(h + HDR, 8 + k);
    put32(h + HDR + 4, k);
    iov[0].iov_len = HDR + 8;
    iov[1] = (struct iovec){mig + *mig_at, k};
    n = 2;
    *mig_at += k;
    put32(h + 4, HDR + 8 + k);
  } else if (cmd == CMD_MIG_DATA_WRITE) {
    put32(h + 4, HDR);
  } else if (cmd == CMD_DEVICE_FEATURE && body >= 8 && (get32(p + HDR + 4) & 0xffffu) == FEAT_LOG_REPORT) {
    uint32_t argsz = get32(p + HDR);
    if (argsz < body) argsz = body;
    if (argsz - body > ZERO_CAP) argsz = body + ZERO_CAP;
    iov[1] = (struct iovec){p + HDR, body};
    iov[2] = (struct iovec){zeros, argsz - body};
    n = 3;
    put32(h + 4, HDR + argsz);
  } else {
    iov[1] = (struct iovec){p + HDR, body};
    n = 2;
  }
  return send_iov(fd, iov, n);
}

static void serve(int fd, uint8_t *buf) {
  size_t start = 0, end = 0;
  uint64_t mig_at = 0;
  char ctl[CMSG_SPACE(sizeof(int) * 64)];
  for (;;) {
    while (end - start >= HDR) {
      uint32_t size = get32(buf + start + 4);
      if (size < HDR || size > BUF_CAP) {
        fprintf(stderr, "c-echo: bad message size %u, closing\n", size);
        return;
      }
      if (end - start < size) break;
      if (answer(fd, buf + start, size, &mig_at) < 0) return;
      start += size;
    }
    if (start == end) start = end = 0;
    else if (start > 0) { /* what is left is part of one message: move it to the front */
      memmove(buf, buf + start, end - start);
      end -= start;
      start = 0;
    }
    struct iovec iov = {buf + end, BUF_CAP - end};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl)};
    ssize_t r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      for (int i = 0; i < nfd; i++) {
        int x;
        memcpy(&x, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        close(x);
      }
    }
    end += (size_t)r;
  }
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: c-echo SOCKET\n");
    return 2;
  }
  uint8_t *buf = malloc(BUF_CAP);
  zeros = calloc(1, ZERO_CAP);
  mig = malloc(MIG_SIZE);
  if (!buf || !zeros || !mig) {
    fprintf(stderr, "c-echo: out of memory\n");
    return 1;
  }
  uint32_t x = 0x9e3779b9u, *w = (uint32_t *)mig;
  for (size_t i = 0; i < MIG_SIZE / 4; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    w[i] = x;
  }
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(argv[1]) >= sizeof(a.sun_path)) {
    fprintf(stderr, "c-echo: socket path too long\n");
    return 2;
  }
  strcpy(a.sun_path, argv[1]);
  unlink(argv[1]);
  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 8) < 0) {
    perror("c-echo: listen");
    return 1;
  }
  printf("listening\n");
  fflush(stdout);
  for (;;) {
    int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      perror("c-echo: accept");
      return 1;
    }
    serve(fd, buf);
    close(fd);
  }
}
