/* door.c: handing a segment's descriptor to the ranks of its job, and to nobody else.
 *
 * A segment is a memfd: it has no name, so no other process can open it.  Its creator (rank 0)
 * hands the descriptor out through a door, an abstract Unix socket named by one half of the
 * group's key (a digest of the job's secret id; the name vanishes with the socket).  A rank
 * knocks with the key's other half, the ticket, and its rank; rank 0 sends the descriptor
 * (SCM_RIGHTS) only to a process of its own user (SO_PEERCRED) that shows the ticket, once per
 * rank, and refuses anyone else.  The knocker checks that the door belongs to its user too.
 * The ticket crosses only this socket, whose name only the job's ranks can derive before rank 0
 * binds it. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define HALF (NCL_KEY_CHARS / 2)
#define ANSWER_S 1.0 /* a knocker that says nothing this long is dropped (a stalled stranger) */

typedef struct {
    char ticket[HALF];
    int32_t rank;
} knock_msg;

enum { ADMITTED = 0, WRONG_TICKET = 1, BAD_RANK = 2 };

static const char* refusal(int32_t why) {
    return why == WRONG_TICKET ? "it does not know the job's secret id" : "its rank is taken or out of range";
}

/* The door's address: "\0ncl-" + the key's first half + suffix (abstract: no file). */
static socklen_t door_address(struct sockaddr_un* a, const char* key, const char* suffix) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "ncl-%.*s%s", HALF, key, suffix);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

static bool key_ok(const char* key, const char* suffix) {
    return key && strlen(key) == NCL_KEY_CHARS && strlen(suffix) < 48;
}

static bool same_user(int sock, pid_t* pid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
    if (pid) *pid = cred.pid;
    return cred.uid == getuid();
}

int ncl_door_open(const char* key, const char* suffix, int* door_out) {
    if (!key_ok(key, suffix)) return ncl_error(NCL_ERR_ARGUMENT, "a segment's key must be %d characters", NCL_KEY_CHARS);
    struct sockaddr_un a;
    socklen_t len = door_address(&a, key, suffix);
    int door = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (door < 0) return ncl_error(NCL_ERR_SYSTEM, "cannot make a Unix socket for setup: %s", strerror(errno));
    if (bind(door, (struct sockaddr*)&a, len) != 0) {
        int err = errno;
        close(door);
        return ncl_error(NCL_ERR_SYSTEM, "cannot bind this group's setup socket: %s%s", strerror(err),
                         err == EADDRINUSE ? " (a unique id was reused: take a fresh ncl.get_unique_id())" : "");
    }
    *door_out = door;
    return NCL_OK;
}

int ncl_door_listen(int door) {
    if (listen(door, NCL_MAX_RANKS) != 0)
        return ncl_error(NCL_ERR_SYSTEM, "cannot listen on this group's setup socket: %s", strerror(errno));
    return NCL_OK;
}

/* One knock: read it (bounded in time), check it, answer it. */
static void answer(int sock, int fd, const char* key, int nranks, bool* admitted) {
    knock_msg m;
    struct timeval tv = {(time_t)ANSWER_S, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv); /* a knocker that stalls is dropped */
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (recv(sock, &m, sizeof m, MSG_WAITALL) != (ssize_t)sizeof m) return;
    int32_t verdict = !same_user(sock, NULL) ? WRONG_TICKET
                      : memcmp(m.ticket, key + HALF, HALF) != 0 ? WRONG_TICKET
                      : m.rank < 1 || m.rank >= nranks || admitted[m.rank] ? BAD_RANK : ADMITTED;
    struct iovec iov = {&verdict, sizeof verdict};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctrl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (verdict == ADMITTED) {
        msg.msg_control = ctrl.buf, msg.msg_controllen = sizeof ctrl.buf;
        struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof verdict && verdict == ADMITTED) admitted[m.rank] = true;
}

int ncl_door_answer(int door, int fd, const char* key, int nranks, bool* admitted, double slice_s) {
    struct pollfd p = {door, POLLIN, 0};
    for (int ms = (int)(slice_s * 1000); poll(&p, 1, ms) == 1; ms = 0) {
        int sock = accept4(door, NULL, NULL, SOCK_CLOEXEC);
        if (sock < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
            return ncl_error(NCL_ERR_SYSTEM, "setup socket: accept failed: %s", strerror(errno));
        }
        answer(sock, fd, key, nranks, admitted);
        close(sock);
    }
    return NCL_OK;
}

int ncl_door_knock(const char* key, const char* suffix, int rank, double deadline, int* fd_out) {
    *fd_out = -1;
    if (!key_ok(key, suffix)) return ncl_error(NCL_ERR_ARGUMENT, "a segment's key must be %d characters", NCL_KEY_CHARS);
    struct sockaddr_un a;
    socklen_t len = door_address(&a, key, suffix);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return ncl_error(NCL_ERR_SYSTEM, "cannot make a Unix socket for setup: %s", strerror(errno));
    if (connect(sock, (struct sockaddr*)&a, len) != 0) { /* nobody listens (yet, or any more) */
        close(sock);
        return NCL_OK;
    }
    pid_t owner = 0;
    if (!same_user(sock, &owner)) {
        close(sock);
        return ncl_error(NCL_ERR_SYSTEM, "this group's setup socket belongs to another user (pid %d)", (int)owner);
    }
    knock_msg m = {.rank = rank};
    memcpy(m.ticket, key + HALF, HALF);
    int32_t verdict = -1;
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctrl;
    struct iovec iov = {&verdict, sizeof verdict};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl.buf, .msg_controllen = sizeof ctrl.buf};
    int rc = NCL_OK;
    if (send(sock, &m, sizeof m, MSG_NOSIGNAL) != (ssize_t)sizeof m) goto out; /* rank 0 went away: knock again */
    for (struct pollfd p = {sock, POLLIN, 0}; poll(&p, 1, 50) != 1;) { /* rank 0 may be answering others */
        if ((rc = ncl_interrupted("communicator setup")) != NCL_OK) goto out;
        if (ncl_now() > deadline) {
            rc = ncl_error(NCL_ERR_TIMEOUT, "rank 0 (pid %d) never answered this rank's knock", (int)owner);
            goto out;
        }
    }
    if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != (ssize_t)sizeof verdict) goto out; /* gone meanwhile */
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    if (verdict == ADMITTED && c && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(fd_out, CMSG_DATA(c), sizeof(int));
    else if (verdict == WRONG_TICKET || verdict == BAD_RANK)
        rc = ncl_error(NCL_ERR_MISMATCH, "rank 0 (pid %d) refused rank %d: %s", (int)owner, rank, refusal(verdict));
out:
    close(sock);
    return rc;
}
