/*
 * vfio_native: the few syscalls Node cannot make on its own, for the
 * vfio-user UNIX-socket transport and guest-memory mapping.
 *
 *   - AF_UNIX stream sockets with SCM_RIGHTS fd passing (recvmsg/sendmsg),
 *   - a uv_poll_t watcher so the event loop tells us when an fd is ready,
 *   - mmap of a received fd as an external ArrayBuffer, detached on munmap,
 *   - memfd_create, eventfd, dup, close, fstat size (tests and DMA checks).
 *
 * Conventions (see src/transport/native.ts for the typed surface):
 *   - Every call is synchronous and never blocks except connect() (blocking
 *     connect on a local socket, like QEMU's client does).
 *   - Syscall failures are returned as a negative errno (-EAGAIN, ...).
 *     Only wrong JS argument types throw (TypeError).
 *   - Every fd created here is O_CLOEXEC; sockets are O_NONBLOCK; received
 *     fds get MSG_CMSG_CLOEXEC.
 *
 * Linux only. Plain C on node_api.h (Node-API 8) and uv.h.
 */
#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* The kernel's per-sendmsg limit (SCM_MAX_FD). */
#define MAX_FDS 253
/* iovecs per sendmsg; more buffers than this are a partial send. */
#define MAX_IOV 64
/* Largest single mapping: Node aborts on an external buffer above 4 GiB. */
#define MAX_MAP_LEN ((uint64_t)1 << 32)

/* ------------------------------------------------------------------------ */
/* Argument helpers                                                          */

#define CHECK_NAPI(call)                                                      \
  do {                                                                        \
    if ((call) != napi_ok) return NULL;                                       \
  } while (0)

#define GET_ARGS(n)                                                           \
  size_t argc = (n);                                                          \
  napi_value argv[(n)];                                                       \
  napi_value self;                                                            \
  CHECK_NAPI(napi_get_cb_info(env, info, &argc, argv, &self, NULL))

static napi_value throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

static int is_type(napi_env env, napi_value v, napi_valuetype want) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return 0;
  return t == want;
}

static int is_nullish(napi_env env, napi_value v) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return 0;
  return t == napi_null || t == napi_undefined;
}

/* An int32 argument (fds, flags). Throws and returns 0 on a wrong type. */
static int arg_i32(napi_env env, napi_value v, int32_t *out, const char *what) {
  if (!is_type(env, v, napi_number)) {
    throw_type(env, what);
    return 0;
  }
  return napi_get_value_int32(env, v, out) == napi_ok;
}

/* A u64 argument given as a bigint (lossless) or a non-negative integer
 * Number (at most 2^53). Throws and returns 0 on a wrong type or range. */
static int arg_u64(napi_env env, napi_value v, uint64_t *out, const char *what) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return 0;
  if (t == napi_bigint) {
    bool lossless = false;
    if (napi_get_value_bigint_uint64(env, v, out, &lossless) != napi_ok) return 0;
    if (!lossless) {
      throw_type(env, what);
      return 0;
    }
    return 1;
  }
  if (t == napi_number) {
    double d;
    if (napi_get_value_double(env, v, &d) != napi_ok) return 0;
    if (!(d >= 0) || d > 9007199254740992.0 || d != (double)(uint64_t)d) {
      throw_type(env, what);
      return 0;
    }
    *out = (uint64_t)d;
    return 1;
  }
  throw_type(env, what);
  return 0;
}

static napi_value ret_i32(napi_env env, int32_t v) {
  napi_value r;
  CHECK_NAPI(napi_create_int32(env, v, &r));
  return r;
}

static napi_value ret_i64(napi_env env, int64_t v) {
  napi_value r;
  CHECK_NAPI(napi_create_int64(env, v, &r));
  return r;
}

/* Copies a socket path into addr. Returns 0, -ENAMETOOLONG, -EINVAL (empty
 * or embedded NUL: abstract sockets are not supported) or 1 after throwing
 * for a non-string. */
static int arg_sockaddr(napi_env env, napi_value v, struct sockaddr_un *addr) {
  size_t len = 0, copied = 0;
  if (!is_type(env, v, napi_string)) {
    throw_type(env, "path must be a string");
    return 1;
  }
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return 1;
  memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (len >= sizeof(addr->sun_path)) return -ENAMETOOLONG;
  if (napi_get_value_string_utf8(env, v, addr->sun_path, sizeof(addr->sun_path), &copied) !=
      napi_ok)
    return 1;
  if (copied == 0 || strlen(addr->sun_path) != copied) return -EINVAL;
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Sockets                                                                   */

/* Send buffer asked for on every connected socket. For AF_UNIX stream
 * sockets the sender's buffer bounds the bytes in flight, and the default
 * (net.core.wmem_default, ~208 KiB) splits a 1 MiB reply (the default
 * max_data_xfer_size) into five sendmsg calls, each after a poll wake-up
 * once the peer has read some, and the unsent rest is copied into the queue.
 * The kernel doubles the value (1.5 MiB: one such reply goes out in one
 * sendmsg) after capping it at net.core.wmem_max (then the default's double
 * at least). Failure is harmless, so it is ignored. */
#define SOCKET_SNDBUF (768 << 10)

static void tune_socket(int fd) {
  int sz = SOCKET_SNDBUF;
  (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
}

/* listen(path, backlog, mode?) -> fd | -errno
 * socket + bind + [chmod(path, mode)] + listen. The chmod happens between
 * bind and listen, so nobody can connect before the mode is applied. When
 * chmod or listen fail, the socket file just created is removed again. */
static napi_value js_listen(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  struct sockaddr_un addr;
  int r = arg_sockaddr(env, argv[0], &addr);
  if (r == 1) return NULL;
  if (r < 0) return ret_i32(env, r);
  int32_t backlog = 0, mode = -1;
  if (!arg_i32(env, argv[1], &backlog, "backlog must be a number")) return NULL;
  if (!is_nullish(env, argv[2]) && !arg_i32(env, argv[2], &mode, "mode must be a number"))
    return NULL;

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return ret_i32(env, -errno);
  if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
    int e = errno;
    close(fd);
    return ret_i32(env, -e);
  }
  if ((mode >= 0 && chmod(addr.sun_path, (mode_t)mode) < 0) || listen(fd, backlog) < 0) {
    int e = errno;
    unlink(addr.sun_path);
    close(fd);
    return ret_i32(env, -e);
  }
  return ret_i32(env, fd);
}

/* accept(fd) -> fd | -errno (-EAGAIN when no connection is pending). */
static napi_value js_accept(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int32_t lfd;
  if (!arg_i32(env, argv[0], &lfd, "fd must be a number")) return NULL;
  int fd;
  do {
    fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  } while (fd < 0 && (errno == EINTR || errno == ECONNABORTED));
  if (fd >= 0) tune_socket(fd);
  return ret_i32(env, fd < 0 ? -errno : fd);
}

/* connect(path, nonblocking?) -> fd | -errno
 * Default: a blocking connect (a local peer answers at once unless its
 * backlog is full), then the fd is made non-blocking.
 * nonblocking=true: never waits; a full backlog yields -EAGAIN (the fd is
 * closed). Used to probe whether a server is alive at a path. */
static napi_value js_connect(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  struct sockaddr_un addr;
  int r = arg_sockaddr(env, argv[0], &addr);
  if (r == 1) return NULL;
  if (r < 0) return ret_i32(env, r);
  bool nonblocking = false;
  if (!is_nullish(env, argv[1])) {
    if (!is_type(env, argv[1], napi_boolean)) return throw_type(env, "nonblocking must be a boolean");
    CHECK_NAPI(napi_get_value_bool(env, argv[1], &nonblocking));
  }

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
  if (fd < 0) return ret_i32(env, -errno);
  if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
    int e = errno;
    if (e == EINTR && !nonblocking) {
      /* The connect goes on in the background: wait for it. */
      struct pollfd p = {.fd = fd, .events = POLLOUT};
      int pr;
      do {
        pr = poll(&p, 1, -1);
      } while (pr < 0 && errno == EINTR);
      socklen_t sl = sizeof(e);
      if (pr < 0)
        e = errno;
      else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &sl) < 0)
        e = errno;
    }
    if (e == EINPROGRESS) e = EAGAIN;
    if (e != 0) {
      close(fd);
      return ret_i32(env, -e);
    }
  }
  tune_socket(fd);
  if (!nonblocking) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
      int e = errno;
      close(fd);
      return ret_i32(env, -e);
    }
  }
  return ret_i32(env, fd);
}

/* recv(fd, buf, fdsOut) -> bytes | -errno   (0 = EOF)
 *
 * One recvmsg into buf with control space for up to min(253,
 * fdsOut.length - 1) fds. On return fdsOut[0] holds the number of fds
 * received and fdsOut[1..] the fds (owned by the caller from now on).
 *
 * Lost fds: when the kernel truncated the control data (MSG_CTRUNC) or more
 * fds arrived than fdsOut can hold, every fd of this read is closed and
 * fdsOut[0] = -1. The bytes are still returned; the caller must treat the
 * stream as broken (a message's fds are gone). Control messages other than
 * SCM_RIGHTS are ignored. */
static napi_value js_recv(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int32_t fd;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  bool ok = false;
  CHECK_NAPI(napi_is_buffer(env, argv[1], &ok));
  if (!ok) return throw_type(env, "buf must be a Buffer or Uint8Array");
  void *data = NULL;
  size_t len = 0;
  CHECK_NAPI(napi_get_buffer_info(env, argv[1], &data, &len));
  if (len == 0) return throw_type(env, "buf must not be empty");

  napi_typedarray_type tt;
  size_t fds_len = 0;
  void *fds_data = NULL;
  CHECK_NAPI(napi_is_typedarray(env, argv[2], &ok));
  if (!ok) return throw_type(env, "fdsOut must be an Int32Array");
  CHECK_NAPI(napi_get_typedarray_info(env, argv[2], &tt, &fds_len, &fds_data, NULL, NULL));
  if (tt != napi_int32_array || fds_len < 1)
    return throw_type(env, "fdsOut must be an Int32Array of length >= 1");
  int32_t *fds_out = fds_data;
  size_t room = fds_len - 1 < MAX_FDS ? fds_len - 1 : MAX_FDS;

  union {
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
  } control;
  struct iovec iov = {.iov_base = data, .iov_len = len};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (room > 0) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * room);
  }

  ssize_t n;
  do {
    n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  fds_out[0] = 0;
  if (n < 0) return ret_i32(env, -errno);

  size_t count = 0;
  int lost = (msg.msg_flags & MSG_CTRUNC) != 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char *p = CMSG_DATA(c);
    for (size_t i = 0; i < nfd; i++) {
      int rfd;
      memcpy(&rfd, p + i * sizeof(int), sizeof(int));
      if (count < room)
        fds_out[1 + count++] = rfd;
      else {
        close(rfd);
        lost = 1;
      }
    }
  }
  if (lost) {
    for (size_t i = 0; i < count; i++) close(fds_out[1 + i]);
    fds_out[0] = -1;
  } else {
    fds_out[0] = (int32_t)count;
  }
  return ret_i64(env, (int64_t)n);
}

/* send(fd, bufs, fds) -> bytes sent | -errno
 * One sendmsg (MSG_NOSIGNAL | MSG_DONTWAIT) with an iovec per buffer (at
 * most 64; later buffers are simply not sent, which looks like a partial
 * send) and fds (Int32Array, or null) as SCM_RIGHTS on the first byte.
 * The result may be short: the caller re-sends the rest without fds. */
static napi_value js_send(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int32_t fd;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  bool ok = false;
  CHECK_NAPI(napi_is_array(env, argv[1], &ok));
  if (!ok) return throw_type(env, "bufs must be an array of Buffer/Uint8Array");
  uint32_t nbufs = 0;
  CHECK_NAPI(napi_get_array_length(env, argv[1], &nbufs));

  struct iovec iov[MAX_IOV];
  size_t iovcnt = 0;
  for (uint32_t i = 0; i < nbufs && iovcnt < MAX_IOV; i++) {
    napi_value el;
    CHECK_NAPI(napi_get_element(env, argv[1], i, &el));
    CHECK_NAPI(napi_is_buffer(env, el, &ok));
    if (!ok) return throw_type(env, "bufs must be an array of Buffer/Uint8Array");
    void *data = NULL;
    size_t len = 0;
    CHECK_NAPI(napi_get_buffer_info(env, el, &data, &len));
    if (len == 0) continue;
    iov[iovcnt].iov_base = data;
    iov[iovcnt].iov_len = len;
    iovcnt++;
  }

  union {
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
  } control;
  struct msghdr msg = {0};
  msg.msg_iov = iov;
  msg.msg_iovlen = iovcnt;

  if (!is_nullish(env, argv[2])) {
    napi_typedarray_type tt;
    size_t nfds = 0;
    void *fds_data = NULL;
    CHECK_NAPI(napi_is_typedarray(env, argv[2], &ok));
    if (!ok) return throw_type(env, "fds must be an Int32Array or null");
    CHECK_NAPI(napi_get_typedarray_info(env, argv[2], &tt, &nfds, &fds_data, NULL, NULL));
    if (tt != napi_int32_array) return throw_type(env, "fds must be an Int32Array or null");
    if (nfds > MAX_FDS) return ret_i32(env, -EINVAL);
    if (nfds > 0) {
      if (iovcnt == 0) return ret_i32(env, -EINVAL); /* fds need at least one byte */
      memset(control.buf, 0, sizeof(control.buf));
      msg.msg_control = control.buf;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
      struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
      memcpy(CMSG_DATA(c), fds_data, sizeof(int) * nfds);
    }
  }
  if (iovcnt == 0) return ret_i32(env, 0);

  ssize_t n;
  do {
    n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  return ret_i64(env, n < 0 ? -(int64_t)errno : (int64_t)n);
}

/* ------------------------------------------------------------------------ */
/* Plain fd helpers                                                          */

/* close(fd) -> 0 | -errno (EINTR counts as closed on Linux). */
static napi_value js_close(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int32_t fd;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  if (close(fd) < 0 && errno != EINTR) return ret_i32(env, -errno);
  return ret_i32(env, 0);
}

/* dup(fd) -> new fd (cloexec) | -errno */
static napi_value js_dup(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int32_t fd;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return ret_i32(env, r < 0 ? -errno : r);
}

/* setNonblocking(fd, on) -> 0 | -errno: O_NONBLOCK on or off (F_GETFL/F_SETFL).
 * The flag lives in the open file description, so a received fd shares it
 * with the process that sent it. */
static napi_value js_set_nonblocking(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int32_t fd;
  bool on;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  if (napi_get_value_bool(env, argv[1], &on) != napi_ok) return throw_type(env, "on must be a boolean");
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return ret_i32(env, -errno);
  int want = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (want != flags && fcntl(fd, F_SETFL, want) < 0) return ret_i32(env, -errno);
  return ret_i32(env, 0);
}

/* memfdCreate(name, size) -> fd | -errno  (MFD_CLOEXEC, then ftruncate) */
static napi_value js_memfd_create(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  char name[250];
  size_t copied;
  if (!is_type(env, argv[0], napi_string)) return throw_type(env, "name must be a string");
  CHECK_NAPI(napi_get_value_string_utf8(env, argv[0], name, sizeof(name), &copied));
  uint64_t size;
  if (!arg_u64(env, argv[1], &size, "size must be a non-negative bigint or integer")) return NULL;
  if (size > INT64_MAX) return ret_i32(env, -EINVAL);
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) return ret_i32(env, -errno);
  if (ftruncate(fd, (off_t)size) < 0) {
    int e = errno;
    close(fd);
    return ret_i32(env, -e);
  }
  return ret_i32(env, fd);
}

/* eventfd(initval, flags) -> fd | -errno  (EFD_CLOEXEC|EFD_NONBLOCK added) */
static napi_value js_eventfd(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int32_t initval, flags;
  if (!arg_i32(env, argv[0], &initval, "initval must be a number")) return NULL;
  if (!arg_i32(env, argv[1], &flags, "flags must be a number")) return NULL;
  int fd = eventfd((unsigned int)initval, flags | EFD_CLOEXEC | EFD_NONBLOCK);
  return ret_i32(env, fd < 0 ? -errno : fd);
}

/* fstatSize(fd) -> st_size as bigint | -errno as a negative bigint */
static napi_value js_fstat_size(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int32_t fd;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  struct stat st;
  int64_t v = fstat(fd, &st) < 0 ? -(int64_t)errno : (int64_t)st.st_size;
  napi_value r;
  CHECK_NAPI(napi_create_bigint_int64(env, v, &r));
  return r;
}

/* ------------------------------------------------------------------------ */
/* mmap                                                                      */

/* Shared by the ArrayBuffer's finalizer and munmap(): whoever unmaps first
 * clears `mapped`; the finalizer frees the struct. */
typedef struct mapping {
  void *base;
  size_t len;
  int mapped;
} mapping_t;

static void mapping_finalize(napi_env env, void *data, void *hint) {
  mapping_t *m = hint;
  if (m->mapped) munmap(m->base, m->len);
  m->mapped = 0;
  free(m);
}

/* mmap(fd, offset, length, writable) -> ArrayBuffer | -errno
 * MAP_SHARED, PROT_READ[|PROT_WRITE]. offset need not be page aligned (the
 * mapping starts at the page below; the ArrayBuffer starts at offset).
 * length must be 1 .. 4 GiB. The finalizer munmaps if munmap() was not
 * called. Writing to a read-only mapping is a SIGSEGV: never do it. */
static napi_value js_mmap(napi_env env, napi_callback_info info) {
  GET_ARGS(4);
  int32_t fd;
  uint64_t offset, length;
  bool writable = false;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  if (!arg_u64(env, argv[1], &offset, "offset must be a non-negative bigint")) return NULL;
  if (!arg_u64(env, argv[2], &length, "length must be a non-negative bigint or integer"))
    return NULL;
  if (!is_type(env, argv[3], napi_boolean)) return throw_type(env, "writable must be a boolean");
  CHECK_NAPI(napi_get_value_bool(env, argv[3], &writable));

  if (length == 0 || length > MAX_MAP_LEN || offset > (uint64_t)INT64_MAX - length)
    return ret_i32(env, -EINVAL);
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  uint64_t delta = offset % page;
  size_t maplen = (size_t)(length + delta);
  void *p = mmap(NULL, maplen, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd,
                 (off_t)(offset - delta));
  if (p == MAP_FAILED) return ret_i32(env, -errno);

  mapping_t *m = malloc(sizeof(*m));
  if (m == NULL) {
    munmap(p, maplen);
    return ret_i32(env, -ENOMEM);
  }
  m->base = p;
  m->len = maplen;
  m->mapped = 1;
  napi_value ab;
  if (napi_create_external_arraybuffer(env, (char *)p + delta, (size_t)length, mapping_finalize,
                                       m, &ab) != napi_ok) {
    munmap(p, maplen);
    free(m);
    return NULL;
  }
  /* munmap(ab) finds the struct through the wrap; no finalizer on it. */
  if (napi_wrap(env, ab, m, NULL, NULL, NULL) != napi_ok) return NULL;
  return ab;
}

/* munmap(ab) -> 0 | -errno. Detaches the ArrayBuffer first (every view of
 * it now has length 0, so late JS access throws or reads nothing instead of
 * faulting), then unmaps. Idempotent: a detached buffer returns 0. */
static napi_value js_munmap(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  bool ok = false;
  CHECK_NAPI(napi_is_arraybuffer(env, argv[0], &ok));
  if (!ok) return throw_type(env, "argument must be an ArrayBuffer from mmap()");
  CHECK_NAPI(napi_is_detached_arraybuffer(env, argv[0], &ok));
  if (ok) return ret_i32(env, 0);
  void *ptr = NULL;
  if (napi_unwrap(env, argv[0], &ptr) != napi_ok || ptr == NULL) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value e;
      napi_get_and_clear_last_exception(env, &e);
    }
    return throw_type(env, "argument must be an ArrayBuffer from mmap()");
  }
  mapping_t *m = ptr;
  void *base = m->base;
  size_t len = m->len;
  int mapped = m->mapped;
  /* Clear before detaching: the finalizer may run (and free m) once the
   * backing store is released. m is not touched after the detach. */
  m->mapped = 0;
  napi_remove_wrap(env, argv[0], NULL);
  if (napi_detach_arraybuffer(env, argv[0]) != napi_ok) {
    /* Cannot happen for our external buffers; keep the mapping alive
     * rather than leave JS a view of unmapped memory. */
    m->mapped = mapped;
    napi_wrap(env, argv[0], m, NULL, NULL, NULL);
    return ret_i32(env, -EBUSY);
  }
  if (mapped && munmap(base, len) < 0) return ret_i32(env, -errno);
  return ret_i32(env, 0);
}

/* ------------------------------------------------------------------------ */
/* Watcher: uv_poll_t on an fd, calling back into JS                        */

typedef struct addon_state addon_state_t;

typedef struct watcher {
  uv_poll_t handle;
  napi_env env;
  napi_ref cb_ref;   /* strong while open: the JS callback */
  napi_ref self_ref; /* the JS object: strong while started, weak otherwise */
  addon_state_t *state;
  struct watcher *prev, *next; /* live list, closed on env teardown */
  int started;
  int closing;       /* uv_close called (or about to be) */
  int handle_closed; /* uv close callback ran */
  int wrapped;       /* the JS object still points at us */
} watcher_t;

struct addon_state {
  watcher_t *head;
};

static void watcher_unlink(watcher_t *w) {
  if (w->state == NULL) return;
  if (w->prev)
    w->prev->next = w->next;
  else
    w->state->head = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = NULL;
  w->state = NULL;
}

/* Freed when both the uv handle is closed and the JS object let go. */
static void watcher_maybe_free(watcher_t *w) {
  if (w->handle_closed && !w->wrapped) free(w);
}

static void watcher_close_cb(uv_handle_t *h) {
  watcher_t *w = h->data;
  w->handle_closed = 1;
  watcher_maybe_free(w);
}

/* Stops polling and starts closing the handle. Does not touch JS refs. */
static void watcher_begin_close(watcher_t *w) {
  if (w->closing) return;
  w->closing = 1;
  uv_poll_stop(&w->handle);
  uv_close((uv_handle_t *)&w->handle, watcher_close_cb);
  watcher_unlink(w);
}

static void watcher_poll_cb(uv_poll_t *h, int status, int events) {
  watcher_t *w = h->data;
  if (w->closing) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb = NULL, recv = NULL, args[2];
  if (w->cb_ref) napi_get_reference_value(env, w->cb_ref, &cb);
  if (w->self_ref) napi_get_reference_value(env, w->self_ref, &recv);
  if (recv == NULL) napi_get_undefined(env, &recv);
  if (cb != NULL) {
    napi_create_int32(env, events, &args[0]);
    napi_create_int32(env, status, &args[1]);
    /* make_callback (not call_function): runs process.nextTick and
     * microtasks afterwards, as for any I/O callback. A throw comes back as
     * a pending exception: hand it to Node's uncaught-exception path. */
    napi_status s = napi_make_callback(env, NULL, recv, cb, 2, args, NULL);
    if (s != napi_ok) {
      bool pending = false;
      napi_is_exception_pending(env, &pending);
      if (pending) {
        napi_value exc;
        if (napi_get_and_clear_last_exception(env, &exc) == napi_ok) napi_fatal_exception(env, exc);
      }
    }
  }
  napi_close_handle_scope(env, scope);
}

static void watcher_finalize(napi_env env, void *data, void *hint) {
  watcher_t *w = data;
  w->wrapped = 0;
  if (w->cb_ref) napi_delete_reference(env, w->cb_ref);
  if (w->self_ref) napi_delete_reference(env, w->self_ref);
  w->cb_ref = w->self_ref = NULL;
  if (!w->closing)
    watcher_begin_close(w); /* freed in the close callback */
  else
    watcher_maybe_free(w);
}

static void env_cleanup(void *arg) {
  addon_state_t *st = arg;
  for (watcher_t *w = st->head, *next; w != NULL; w = next) {
    next = w->next;
    w->state = NULL;
    w->prev = w->next = NULL;
    if (!w->closing) {
      w->closing = 1;
      uv_poll_stop(&w->handle);
      uv_close((uv_handle_t *)&w->handle, watcher_close_cb);
    }
  }
  free(st);
}

/* new Watcher(fd, callback(events, status)) */
static napi_value watcher_new(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], self;
  void *data = NULL;
  CHECK_NAPI(napi_get_cb_info(env, info, &argc, argv, &self, &data));
  napi_value target = NULL;
  CHECK_NAPI(napi_get_new_target(env, info, &target));
  if (target == NULL) return throw_type(env, "Watcher must be called with new");
  int32_t fd;
  if (!arg_i32(env, argv[0], &fd, "fd must be a number")) return NULL;
  if (!is_type(env, argv[1], napi_function)) return throw_type(env, "callback must be a function");

  uv_loop_t *loop = NULL;
  CHECK_NAPI(napi_get_uv_event_loop(env, &loop));
  watcher_t *w = calloc(1, sizeof(*w));
  if (w == NULL) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  int r = uv_poll_init(loop, &w->handle, fd);
  if (r < 0) {
    free(w);
    napi_throw_error(env, uv_err_name(r), uv_strerror(r));
    return NULL;
  }
  w->handle.data = w;
  w->env = env;
  if (napi_create_reference(env, argv[1], 1, &w->cb_ref) != napi_ok ||
      napi_create_reference(env, self, 0, &w->self_ref) != napi_ok ||
      napi_wrap(env, self, w, watcher_finalize, NULL, NULL) != napi_ok) {
    if (w->cb_ref) napi_delete_reference(env, w->cb_ref);
    if (w->self_ref) napi_delete_reference(env, w->self_ref);
    w->cb_ref = w->self_ref = NULL;
    w->closing = 1;
    uv_close((uv_handle_t *)&w->handle, watcher_close_cb); /* frees w */
    return NULL;
  }
  w->wrapped = 1;
  addon_state_t *st = data;
  w->state = st;
  w->next = st->head;
  if (st->head) st->head->prev = w;
  st->head = w;
  return self;
}

static watcher_t *watcher_this(napi_env env, napi_callback_info info, size_t *argc,
                               napi_value *argv, napi_value *self) {
  void *w = NULL;
  if (napi_get_cb_info(env, info, argc, argv, self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, *self, &w) != napi_ok) return NULL;
  return w;
}

/* start(events) -> 0 | negative uv error (-EBADF after close). */
static napi_value watcher_start(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], self;
  watcher_t *w = watcher_this(env, info, &argc, argv, &self);
  int32_t events;
  if (!arg_i32(env, argv[0], &events, "events must be a number")) return NULL;
  if (w == NULL || w->closing) return ret_i32(env, -EBADF);
  events &= UV_READABLE | UV_WRITABLE | UV_DISCONNECT | UV_PRIORITIZED;
  if (events == 0) {
    uv_poll_stop(&w->handle);
    if (w->started) napi_reference_unref(env, w->self_ref, NULL);
    w->started = 0;
    return ret_i32(env, 0);
  }
  int r = uv_poll_start(&w->handle, events, watcher_poll_cb);
  if (r < 0) return ret_i32(env, r);
  if (!w->started) napi_reference_ref(env, w->self_ref, NULL);
  w->started = 1;
  return ret_i32(env, 0);
}

/* stop() */
static napi_value watcher_stop(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  napi_value self;
  watcher_t *w = watcher_this(env, info, &argc, NULL, &self);
  if (w != NULL && !w->closing) {
    uv_poll_stop(&w->handle);
    if (w->started) napi_reference_unref(env, w->self_ref, NULL);
    w->started = 0;
  }
  return NULL;
}

/* close(): stop, release the callback, close the handle (memory is freed in
 * the uv close callback). Idempotent; safe inside the watcher's callback. */
static napi_value watcher_close(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  napi_value self;
  watcher_t *w = watcher_this(env, info, &argc, NULL, &self);
  if (w == NULL) return NULL; /* already closed: the wrap is gone */
  napi_remove_wrap(env, self, NULL);
  w->wrapped = 0;
  if (w->cb_ref) napi_delete_reference(env, w->cb_ref);
  if (w->self_ref) napi_delete_reference(env, w->self_ref);
  w->cb_ref = w->self_ref = NULL;
  w->started = 0;
  if (!w->closing)
    watcher_begin_close(w);
  else
    watcher_maybe_free(w);
  return NULL;
}

/* ref()/unref(): whether an active watcher keeps the event loop alive. */
static napi_value watcher_ref(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  napi_value self;
  watcher_t *w = watcher_this(env, info, &argc, NULL, &self);
  if (w != NULL && !w->closing) uv_ref((uv_handle_t *)&w->handle);
  return NULL;
}

static napi_value watcher_unref(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  napi_value self;
  watcher_t *w = watcher_this(env, info, &argc, NULL, &self);
  if (w != NULL && !w->closing) uv_unref((uv_handle_t *)&w->handle);
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* CRC-32C (Castagnoli), for the migration stream's records                 */

/* crc32c(data, crc = 0) -> u32: the CRC-32C of data, continuing from crc (the
 * value a previous call returned), so crc32c(B, crc32c(A)) == crc32c(A||B).
 * Pre- and post-inverted as iSCSI/ext4 use it: crc32c("123456789") is
 * 0xe3069283.
 *
 * On x86-64 with SSE4.2, the crc32 instruction over 8 bytes at a time, in
 * three independent streams so its 3-cycle latency is hidden: a run of 3*L
 * bytes is split into three L-byte lanes, each lane's register is computed
 * separately (the second and third from 0), and the three are joined with
 * crc(s, A||B) = shift_L(crc(s, A)) ^ crc(0, B), where shift_L (the register
 * after L zero bytes) is linear in s and tabulated once per L. Elsewhere a
 * byte-wise table. */

#define CRC32C_POLY 0x82f63b78u /* reflected */
#define CRC_LONG 8192
#define CRC_SHORT 256

static uint32_t crc_byte_tab[256];
static int crc_ready = 0;

static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n) {
  while (n--) c = crc_byte_tab[(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#if defined(__x86_64__)
static int crc_hw = 0;
static uint32_t crc_long_tab[4][256];
static uint32_t crc_short_tab[4][256];
static const uint8_t crc_zeros[CRC_LONG];

__attribute__((target("sse4.2"))) static uint32_t crc_hw_run(uint32_t c32, const uint8_t *p, size_t n) {
  uint64_t c = c32;
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t r = (uint32_t)c;
  while (n--) r = __builtin_ia32_crc32qi(r, *p++);
  return r;
}

static uint32_t crc_shift(uint32_t tab[4][256], uint32_t c) {
  return tab[0][c & 0xff] ^ tab[1][(c >> 8) & 0xff] ^ tab[2][(c >> 16) & 0xff] ^ tab[3][c >> 24];
}

/* tab[k][b]: the register after `len` zero bytes, starting from b << 8k. */
static void crc_shift_table(uint32_t tab[4][256], size_t len) {
  uint32_t basis[32];
  for (int i = 0; i < 32; i++) basis[i] = crc_hw_run(1u << i, crc_zeros, len);
  for (int k = 0; k < 4; k++) {
    for (int b = 0; b < 256; b++) {
      uint32_t v = 0;
      for (int i = 0; i < 8; i++)
        if (b & (1 << i)) v ^= basis[8 * k + i];
      tab[k][b] = v;
    }
  }
}

/* Three lanes of `lane` bytes each from p, joined into c (see above). */
__attribute__((target("sse4.2"))) static uint32_t crc_hw_lanes(uint32_t c32, const uint8_t *p, size_t lane,
                                                              uint32_t tab[4][256]) {
  uint64_t c0 = c32, c1 = 0, c2 = 0;
  for (size_t i = 0; i < lane; i += 8) {
    uint64_t a, b, d;
    memcpy(&a, p + i, 8);
    memcpy(&b, p + lane + i, 8);
    memcpy(&d, p + 2 * lane + i, 8);
    c0 = __builtin_ia32_crc32di(c0, a);
    c1 = __builtin_ia32_crc32di(c1, b);
    c2 = __builtin_ia32_crc32di(c2, d);
  }
  uint32_t c = crc_shift(tab, (uint32_t)c0) ^ (uint32_t)c1;
  return crc_shift(tab, c) ^ (uint32_t)c2;
}

static uint32_t crc_hw_all(uint32_t c, const uint8_t *p, size_t n) {
  while (n >= 3 * CRC_LONG) {
    c = crc_hw_lanes(c, p, CRC_LONG, crc_long_tab);
    p += 3 * CRC_LONG;
    n -= 3 * CRC_LONG;
  }
  while (n >= 3 * CRC_SHORT) {
    c = crc_hw_lanes(c, p, CRC_SHORT, crc_short_tab);
    p += 3 * CRC_SHORT;
    n -= 3 * CRC_SHORT;
  }
  return crc_hw_run(c, p, n);
}
#endif

static void crc_init(void) {
  if (crc_ready) return;
  for (uint32_t b = 0; b < 256; b++) {
    uint32_t c = b;
    for (int i = 0; i < 8; i++) c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1)));
    crc_byte_tab[b] = c;
  }
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("sse4.2")) {
    crc_shift_table(crc_long_tab, CRC_LONG);
    crc_shift_table(crc_short_tab, CRC_SHORT);
    crc_hw = 1;
  }
#endif
  crc_ready = 1;
}

static uint32_t crc32c_update(uint32_t crc, const uint8_t *p, size_t n) {
  uint32_t c = ~crc;
#if defined(__x86_64__)
  if (crc_hw) return ~crc_hw_all(c, p, n);
#endif
  return ~crc_sw(c, p, n);
}

static napi_value crc32c_call(napi_env env, napi_callback_info info, int portable) {
  GET_ARGS(2);
  bool ok = false;
  CHECK_NAPI(napi_is_typedarray(env, argv[0], &ok));
  if (!ok) return throw_type(env, "data must be a Uint8Array");
  napi_typedarray_type type;
  size_t len = 0;
  void *data = NULL;
  CHECK_NAPI(napi_get_typedarray_info(env, argv[0], &type, &len, &data, NULL, NULL));
  if (type != napi_uint8_array) return throw_type(env, "data must be a Uint8Array");
  uint32_t crc = 0;
  if (argc >= 2 && !is_nullish(env, argv[1])) {
    if (!is_type(env, argv[1], napi_number)) return throw_type(env, "crc must be a number");
    CHECK_NAPI(napi_get_value_uint32(env, argv[1], &crc));
  }
  napi_value r;
  uint32_t out = portable ? ~crc_sw(~crc, (const uint8_t *)data, len) : crc32c_update(crc, (const uint8_t *)data, len);
  CHECK_NAPI(napi_create_uint32(env, out, &r));
  return r;
}

static napi_value js_crc32c(napi_env env, napi_callback_info info) { return crc32c_call(env, info, 0); }

/* crc32cPortable(data, crc = 0): the same with the byte-wise table, what
 * machines without SSE4.2 run; for tests. */
static napi_value js_crc32c_portable(napi_env env, napi_callback_info info) { return crc32c_call(env, info, 1); }

/* ------------------------------------------------------------------------ */
/* Module                                                                    */

static napi_value init(napi_env env, napi_value exports) {
  crc_init();
  addon_state_t *st = calloc(1, sizeof(*st));
  if (st == NULL) return NULL;
  if (napi_add_env_cleanup_hook(env, env_cleanup, st) != napi_ok) {
    free(st);
    return NULL;
  }

  napi_property_descriptor wprops[] = {
      {"start", NULL, watcher_start, NULL, NULL, NULL, napi_default_method, NULL},
      {"stop", NULL, watcher_stop, NULL, NULL, NULL, napi_default_method, NULL},
      {"close", NULL, watcher_close, NULL, NULL, NULL, napi_default_method, NULL},
      {"ref", NULL, watcher_ref, NULL, NULL, NULL, napi_default_method, NULL},
      {"unref", NULL, watcher_unref, NULL, NULL, NULL, napi_default_method, NULL},
  };
  napi_value watcher_class;
  CHECK_NAPI(napi_define_class(env, "Watcher", NAPI_AUTO_LENGTH, watcher_new, st,
                               sizeof(wprops) / sizeof(wprops[0]), wprops, &watcher_class));

  napi_value readable, writable, max_fds;
  CHECK_NAPI(napi_create_int32(env, UV_READABLE, &readable));
  CHECK_NAPI(napi_create_int32(env, UV_WRITABLE, &writable));
  CHECK_NAPI(napi_create_int32(env, MAX_FDS, &max_fds));

  napi_property_descriptor props[] = {
      {"listen", NULL, js_listen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"accept", NULL, js_accept, NULL, NULL, NULL, napi_enumerable, NULL},
      {"connect", NULL, js_connect, NULL, NULL, NULL, napi_enumerable, NULL},
      {"recv", NULL, js_recv, NULL, NULL, NULL, napi_enumerable, NULL},
      {"send", NULL, js_send, NULL, NULL, NULL, napi_enumerable, NULL},
      {"close", NULL, js_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dup", NULL, js_dup, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setNonblocking", NULL, js_set_nonblocking, NULL, NULL, NULL, napi_enumerable, NULL},
      {"memfdCreate", NULL, js_memfd_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfd", NULL, js_eventfd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fstatSize", NULL, js_fstat_size, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mmap", NULL, js_mmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"munmap", NULL, js_munmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32c", NULL, js_crc32c, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32cPortable", NULL, js_crc32c_portable, NULL, NULL, NULL, napi_enumerable, NULL},
      {"Watcher", NULL, NULL, NULL, NULL, watcher_class, napi_enumerable, NULL},
      {"READABLE", NULL, NULL, NULL, NULL, readable, napi_enumerable, NULL},
      {"WRITABLE", NULL, NULL, NULL, NULL, writable, napi_enumerable, NULL},
      {"MAX_FDS", NULL, NULL, NULL, NULL, max_fds, napi_enumerable, NULL},
  };
  CHECK_NAPI(napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
