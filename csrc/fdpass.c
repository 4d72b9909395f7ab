/* fdpass.c: see fdpass.h. */
#include "fdpass.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/types.h>
#include <unistd.h>

/* Room for one descriptor; a union keeps the buffer aligned for cmsghdr. */
union fd_control {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int))];
};

/* Room to see (and then close) a sender that packed several descriptors. */
union many_control {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * 16)];
};

ssize_t fdpass_send(int sock, int fd, const void *buf, size_t len)
{
    struct iovec iov;
    struct msghdr msg;
    union fd_control control;
    ssize_t n;

    memset(&msg, 0, sizeof(msg));
    iov.iov_base = (void *)buf;
    iov.iov_len = len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;

    if (fd >= 0) {
        struct cmsghdr *cmsg;
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    }

    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
}

/* Close every descriptor carried by the control messages of `msg`. */
static void close_received(struct msghdr *msg)
{
    struct cmsghdr *cmsg;
    for (cmsg = CMSG_FIRSTHDR(msg); cmsg != NULL; cmsg = CMSG_NXTHDR(msg, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
            size_t n = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            size_t i;
            for (i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
                close(fd);
            }
        }
    }
}

/* One recvmsg into buf (len bytes) with room for ancillary data in
 * control (controllen bytes), descriptors close-on-exec, retried on EINTR;
 * msg and iov are the caller's, filled here. */
static ssize_t recv_with_control(int sock, struct msghdr *msg, struct iovec *iov, void *buf, size_t len,
                                 void *control, size_t controllen)
{
    ssize_t n;

    memset(msg, 0, sizeof(*msg));
    iov->iov_base = buf;
    iov->iov_len = len;
    msg->msg_iov = iov;
    msg->msg_iovlen = 1;
    msg->msg_control = control;
    msg->msg_controllen = controllen;
    do {
        n = recvmsg(sock, msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    return n;
}

ssize_t fdpass_recv(int sock, int *fd_out, void *buf, size_t len)
{
    struct iovec iov;
    struct msghdr msg;
    union many_control control;
    struct cmsghdr *cmsg;
    ssize_t n;
    int fd = -1;
    int count = 0;

    *fd_out = -1;
    n = recv_with_control(sock, &msg, &iov, buf, len, control.buf, sizeof(control.buf));
    if (n < 0)
        return -1;

    if (msg.msg_flags & MSG_CTRUNC) {
        /* The message is read; its descriptor is not (EMFILE, or a control
         * buffer too small). Report the payload and say the descriptor was
         * dropped, so the receiver can refuse that one message. */
        close_received(&msg);
        if (msg.msg_flags & MSG_TRUNC) {
            errno = EMSGSIZE;
            return -1;
        }
        *fd_out = FDPASS_DROPPED;
        return n;
    }
    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS ||
            cmsg->cmsg_len != CMSG_LEN(sizeof(int))) {
            close_received(&msg);
            errno = EBADMSG;
            return -1;
        }
        memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
        count++;
    }
    if (count > 1) {
        close_received(&msg);
        errno = EBADMSG;
        return -1;
    }
    if (msg.msg_flags & MSG_TRUNC) {
        close_received(&msg);
        errno = EMSGSIZE;
        return -1;
    }
    *fd_out = fd;
    return n;
}

/* Room for a whole batch of descriptors. */
union batch_control {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * FDPASS_MAX_FDS)];
};

ssize_t fdpass_send_many(int sock, const int *fds, size_t nfds, const void *buf, size_t len)
{
    struct iovec iov;
    struct msghdr msg;
    union batch_control control;
    ssize_t n;

    if (nfds > FDPASS_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = (void *)buf;
    iov.iov_len = len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;

    if (nfds > 0) {
        struct cmsghdr *cmsg;
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
    }

    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
}

ssize_t fdpass_recv_many(int sock, int *fds_out, size_t max_fds, size_t *nfds_out, int *dropped, void *buf,
                         size_t len)
{
    struct iovec iov;
    struct msghdr msg;
    union batch_control control;
    struct cmsghdr *cmsg;
    ssize_t n;
    size_t count = 0;

    *nfds_out = 0;
    *dropped = 0;
    if (max_fds > FDPASS_MAX_FDS)
        max_fds = FDPASS_MAX_FDS;
    n = recv_with_control(sock, &msg, &iov, buf, len, control.buf, sizeof(control.buf));
    if (n < 0)
        return -1;

    if (msg.msg_flags & MSG_TRUNC) {
        close_received(&msg);
        errno = EMSGSIZE;
        return -1;
    }
    /* MSG_CTRUNC (EMFILE): the kernel installed the first descriptors, in
     * order, and dropped the rest; keep those it installed. */
    if (msg.msg_flags & MSG_CTRUNC)
        *dropped = 1;
    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        size_t k;
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS || cmsg->cmsg_len < CMSG_LEN(0)) {
            close_received(&msg);
            errno = EBADMSG;
            return -1;
        }
        k = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        if (count + k > max_fds) {
            close_received(&msg);
            errno = EBADMSG;
            return -1;
        }
        memcpy(fds_out + count, CMSG_DATA(cmsg), k * sizeof(int));
        count += k;
    }
    *nfds_out = count;
    return n;
}

/* Reads the control messages of one received message into `slot` (its
 * descriptors, or its error with every descriptor closed). */
static void take_slot(struct msghdr *msg, size_t n, struct fdpass_slot *slot)
{
    struct cmsghdr *cmsg;
    size_t count = 0;

    slot->len = n;
    slot->nfds = 0;
    slot->dropped = 0;
    slot->error = 0;
    if (msg->msg_flags & MSG_TRUNC) {
        close_received(msg);
        slot->error = EMSGSIZE;
        return;
    }
    if (msg->msg_flags & MSG_CTRUNC)
        slot->dropped = 1;
    for (cmsg = CMSG_FIRSTHDR(msg); cmsg != NULL; cmsg = CMSG_NXTHDR(msg, cmsg)) {
        size_t k;
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS || cmsg->cmsg_len < CMSG_LEN(0)) {
            close_received(msg);
            slot->error = EBADMSG;
            return;
        }
        k = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        if (count + k > FDPASS_MAX_FDS) {
            close_received(msg);
            slot->error = EBADMSG;
            return;
        }
        memcpy(slot->fds + count, CMSG_DATA(cmsg), k * sizeof(int));
        count += k;
    }
    slot->nfds = count;
}

ssize_t fdpass_recv_batch(int sock, struct fdpass_slot *slots, size_t nslots)
{
    struct mmsghdr msgs[FDPASS_MAX_SLOTS];
    struct iovec iovs[FDPASS_MAX_SLOTS];
    union batch_control controls[FDPASS_MAX_SLOTS];
    size_t i;
    int n;

    if (nslots == 0 || nslots > FDPASS_MAX_SLOTS) {
        errno = EINVAL;
        return -1;
    }
    memset(msgs, 0, sizeof(msgs[0]) * nslots);
    for (i = 0; i < nslots; i++) {
        iovs[i].iov_base = slots[i].buf;
        iovs[i].iov_len = slots[i].len;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = controls[i].buf;
        msgs[i].msg_hdr.msg_controllen = sizeof(controls[i].buf);
    }
    do {
        n = recvmmsg(sock, msgs, (unsigned int)nslots, MSG_DONTWAIT | MSG_CMSG_CLOEXEC, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    for (i = 0; i < (size_t)n; i++)
        take_slot(&msgs[i].msg_hdr, msgs[i].msg_len, &slots[i]);
    return n;
}
