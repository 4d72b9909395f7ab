/*
 * fdpass: send and receive one file descriptor together with a payload in
 * a single message over a Unix-domain socket (SCM_RIGHTS).
 *
 * APUE's send_fd/recv_fd, grown up: the payload travels in the same
 * sendmsg as the descriptor (so metadata and descriptor can never be
 * separated), the control buffer is sized with CMSG_SPACE, there is no
 * static state, and every failure is reported through errno.
 *
 * Meant for SOCK_SEQPACKET sockets (one call = one message), but works on
 * any AF_UNIX socket.
 */
#ifndef HANDOFF_FDPASS_H
#define HANDOFF_FDPASS_H

#include <stddef.h>
#include <sys/types.h>

/*
 * Send `len` bytes from `buf` and, when `fd >= 0`, the descriptor `fd`,
 * as one message. Never raises SIGPIPE (MSG_NOSIGNAL); honours the
 * socket's O_NONBLOCK (EAGAIN). Returns the number of bytes sent, or -1
 * with errno set. The caller still owns `fd` and closes it when it wants.
 */
ssize_t fdpass_send(int sock, int fd, const void *buf, size_t len);

/*
 * Receive one message into `buf` (at most `len` bytes). On return
 * `*fd_out` holds a received descriptor (close-on-exec set), -1 when
 * the message carried none, or FDPASS_DROPPED when it carried one that
 * the kernel could not install (MSG_CTRUNC, e.g. EMFILE in the receiver;
 * the payload is still returned, the sender still holds its copy).
 * Returns the payload length, 0 at end of stream, or -1 with errno:
 *   EMSGSIZE  the payload did not fit in `buf` (MSG_TRUNC)
 *   EBADMSG   the message carried more than one descriptor, or an
 *             unexpected control message (all received descriptors closed)
 */
#define FDPASS_DROPPED (-2)

ssize_t fdpass_recv(int sock, int *fd_out, void *buf, size_t len);

/*
 * The most descriptors one message may carry (the kernel's SCM_MAX_FD).
 */
#define FDPASS_MAX_FDS 253

/*
 * As fdpass_send, with `nfds` descriptors (0 to FDPASS_MAX_FDS) in one
 * SCM_RIGHTS control message: the batch travels, and arrives, whole.
 */
ssize_t fdpass_send_many(int sock, const int *fds, size_t nfds, const void *buf, size_t len);

/*
 * As fdpass_recv, for a message carrying up to `max_fds` descriptors
 * (at most FDPASS_MAX_FDS): they are stored in `fds_out` in the order
 * sent (close-on-exec set) and `*nfds_out` says how many. When the kernel
 * could not install all of them (MSG_CTRUNC, e.g. EMFILE) `*dropped` is 1
 * and `fds_out` holds the first `*nfds_out` ones, those it installed (the
 * payload is still returned; the sender still holds every descriptor).
 * Errors as fdpass_recv, plus EBADMSG for more than `max_fds`.
 */
ssize_t fdpass_recv_many(int sock, int *fds_out, size_t max_fds, size_t *nfds_out, int *dropped, void *buf,
                         size_t len);

/*
 * One message slot of fdpass_recv_batch: `buf`/`len` say where its payload
 * goes (in); the rest is filled in for each message received (out).
 */
struct fdpass_slot {
    void *buf;
    size_t len;                /* in: room in buf; out: payload length */
    int fds[FDPASS_MAX_FDS];   /* out: descriptors, in the order sent */
    size_t nfds;               /* out: how many of fds are set */
    int dropped;               /* out: 1 on MSG_CTRUNC, as fdpass_recv_many */
    int error;                 /* out: 0, or EMSGSIZE / EBADMSG for this
                                  message (its descriptors closed) */
};

/* The most slots fdpass_recv_batch fills in one call. */
#define FDPASS_MAX_SLOTS 16

/*
 * Receives every message waiting on `sock`, up to `nslots` (at most
 * FDPASS_MAX_SLOTS), with one recvmmsg(MSG_DONTWAIT) call: message i goes
 * to slots[i], read as fdpass_recv_many reads one (descriptors
 * close-on-exec; a message that fails to read sets its slot's `error`
 * instead of failing the call). Returns how many slots were filled (fewer
 * than `nslots`: no more message was waiting), or -1 with errno (EAGAIN:
 * none). A message of length 0 with no descriptor is the end of stream.
 */
ssize_t fdpass_recv_batch(int sock, struct fdpass_slot *slots, size_t nslots);

#endif
