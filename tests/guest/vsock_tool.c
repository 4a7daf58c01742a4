/* vsock_tool: AF_VSOCK streams for the busybox test guest, which has no vsock client of its own.
 *
 *   vsock_tool connect CID PORT BYTES   connect, then send and receive BYTES at once
 *   vsock_tool listen PORT BYTES        accept one connection, then the same
 *   vsock_tool hold CID PORT            connect and wait until the connection ends
 *
 * The bytes sent are the guest-to-host stream of pyvhost.cli.vsock_streams, the bytes received
 * are compared with its host-to-guest stream (a 64 KiB pseudo-random block per direction,
 * repeated). One line on stdout says how it went; the exit status is 0 only if every byte
 * matched and the peer then closed its side.
 *
 * Built on the host with `gcc -static -O2` by tests/guest/vsock_tool.py.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BLOCK 65536
#define HOST_TO_GUEST 1
#define GUEST_TO_HOST 2

static unsigned char out_block[BLOCK], in_block[BLOCK];

static void make_block(unsigned char *block, uint32_t direction)
{
    uint64_t x = (0x9E3779B9ull * direction) & 0xFFFFFFFFull;
    for (int i = 0; i < BLOCK; i++) {
        x = (x * 1103515245ull + 12345ull) & 0x7FFFFFFFull;
        block[i] = (x >> 16) & 0xFF;
    }
}

static int fail(const char *what)
{
    printf("vsock_tool: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Send BYTES of our stream and receive as many of the peer's at once; then half-close and wait
 * for the peer's end of file. */
static int exchange(int fd, const char *name, unsigned long long total)
{
    unsigned long long sent = 0, received = 0;
    unsigned char buf[BLOCK];
    int eof = 0;

    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    while (received < total || sent < total || !eof) {
        struct pollfd p = {fd, POLLIN | (sent < total ? POLLOUT : 0), 0};
        if (poll(&p, 1, 30000) <= 0)
            return printf("%s: stalled at %llu sent, %llu received\n", name, sent, received), 1;
        if (sent < total && (p.revents & POLLOUT)) {
            size_t off = sent % BLOCK, n = BLOCK - off;
            if (n > total - sent)
                n = total - sent;
            ssize_t w = send(fd, out_block + off, n, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN)
                return fail("send");
            if (w > 0 && (sent += w) == total)
                shutdown(fd, SHUT_WR);
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(fd, buf, sizeof(buf), 0);
            if (r < 0 && errno != EAGAIN)
                return fail("recv");
            if (r == 0)
                eof = 1;
            for (ssize_t i = 0; i < r; i++, received++)
                if (received >= total || buf[i] != in_block[received % BLOCK])
                    return printf("%s: byte %llu differs\n", name, received), 1;
            if (eof && received < total)
                return printf("%s: end of file after %llu bytes\n", name, received), 1;
        }
    }
    printf("%s ok %llu\n", name, total);
    return 0;
}

static int connect_to(unsigned cid, unsigned port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return -1;
    return fd;
}

int main(int argc, char **argv)
{
    char name[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    make_block(out_block, GUEST_TO_HOST);
    make_block(in_block, HOST_TO_GUEST);
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int fd = connect_to(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0));
        if (fd < 0)
            return fail("connect");
        snprintf(name, sizeof(name), "connect %s", argv[3]);
        return exchange(fd, name, strtoull(argv[4], NULL, 0));
    }
    if (argc == 4 && !strcmp(argv[1], "listen")) {
        struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                   .svm_port = strtoul(argv[2], NULL, 0)};
        int lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 1) < 0)
            return fail("listen");
        printf("listening %s\n", argv[2]);
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            return fail("accept");
        snprintf(name, sizeof(name), "listen %s", argv[2]);
        return exchange(fd, name, strtoull(argv[3], NULL, 0));
    }
    if (argc == 4 && !strcmp(argv[1], "hold")) {
        char c;
        int fd = connect_to(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0));
        if (fd < 0)
            return fail("connect");
        printf("holding %s\n", argv[3]);
        ssize_t r = recv(fd, &c, 1, 0);
        if (r < 0)
            return printf("hold %s ended: %s\n", argv[3], strerror(errno)), 0;
        return printf("hold %s ended: %s\n", argv[3], r ? "data" : "end of file"), 0;
    }
    fprintf(stderr, "usage: vsock_tool connect CID PORT BYTES | listen PORT BYTES | hold CID PORT\n");
    return 2;
}
