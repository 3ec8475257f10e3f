// LD_PRELOAD shim for netsniff-ng's trafgen inside a network namespace: before the socket's
// PACKET_TX_RING is set up, raise its send buffer with SO_SNDBUFFORCE (allowed to root,
// unlike the namespace's wmem sysctls), or trafgen stops with "Flushing TX_RING failed".
// Used only by bench/pktgen-vs-trafgen.sh.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/if_packet.h>
#include <sys/socket.h>

#ifndef SOL_PACKET
#define SOL_PACKET 263
#endif

int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
	static int (*real)(int, int, int, const void *, socklen_t);
	if (!real)
		real = (int (*)(int, int, int, const void *, socklen_t))dlsym(RTLD_NEXT, "setsockopt");
	if (level == SOL_PACKET && name == PACKET_TX_RING) {
		int bytes = 1 << 28;
		real(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof(bytes));
	}
	return real(fd, level, name, value, len);
}
