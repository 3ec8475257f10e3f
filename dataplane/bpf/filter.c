// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// xlb's XDP filter. It is not the load balancer: it only decides, per packet, whether xlb
// handles it (redirect to the AF_XDP socket of the receiving queue) or the kernel does
// (XDP_PASS). xlb handles:
//   * traffic to a Service: destination (address, port, protocol) in `steer` as a
//     destination entry (ICMP echo to a VIP: port 0);
//   * the replies of its flows: a source (address, port, protocol) in `steer` as a source
//     entry (backends, in dnat mode), or a destination address in `steer` with port 0 and
//     the any-port flag (xlb's own SNAT addresses, in snat mode);
//   * ICMP errors that quote such a packet (PMTU and unreachables of NATed flows);
//   * malformed packets to a Service's address (an IPv4 header shorter than 20 bytes, a
//     transport header cut short, an IPv6 extension header chain cut short or longer than
//     the filter walks): the kernel would drop them silently, xlb's parser counts them by
//     reason (`steer` entries with STEER_VIP_ADDR, one per VIP address).
// IPv6 extension headers (hop-by-hop, destination options, routing without segments left, a
// first fragment) are walked, up to four, to find the transport header.
//   * fragments after the first (no ports to match) to a Service's or SNAT address, or from a
//     backend's address (`steer` entries with STEER_SOURCE | STEER_ANY_PORT, port and
//     protocol 0): xlb follows their first fragment's translation.
// Everything else — ARP, neighbour discovery, the node's own traffic, other fragments, IPv6
// packets with a routing header that has segments left — goes to the kernel.
// On a node's link (`link_ports`: the veth xlb owns, into which the kernel routes the
// node's and its pods' Service traffic, see control/src/node_link.rs) every unicast IPv4 and
// IPv6 packet is xlb's: the kernel sent it there for xlb, and xlb hands back what is not.
// The control thread keeps `steer` in step with each snapshot; `xsks` holds one AF_XDP
// socket per receive queue.
//
// Built by dataplane/build.rs with `clang -target bpf`; no libbpf headers needed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define always_inline inline __attribute__((always_inline))

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)BPF_FUNC_redirect_map;

// Must match dataplane/src/xsk/filter.rs (`SteerKey`).
struct steer_key {
	__u8 addr[16];  // IPv4: the first four bytes, the rest zero
	__u16 port;     // network order; 0 for ICMP echo and for any-port entries
	__u8 proto;     // IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP, IPPROTO_ICMPV6
	__u8 flags;     // STEER_*
};
#define STEER_SOURCE 1   // match the packet's source (a backend's reply)
#define STEER_IPV6 2
#define STEER_ANY_PORT 4 // match the destination address alone (an SNAT address)
#define STEER_VIP_ADDR 8 // a Service's address (port and protocol 0): malformed packets to it

// Up to 4 M keys (100 000 Services x 10 endpoints need 1.1 M in dnat mode: one per VIP and one
// per backend), allocated as they are added rather than all at load.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 22);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct steer_key);
	__type(value, __u8);
} steer SEC(".maps");

// AF_XDP sockets: slot = port_base[ingress ifindex] + receive queue. Each port has its own
// range of XSK_QUEUES slots, because a socket is bound to one (device, queue) pair.
#define XSK_QUEUES 64
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64 * XSK_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} port_base SEC(".maps");

// The ports that are a node's link (ifindex -> 1).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} link_ports SEC(".maps");

// Counters: [0] redirected, [1] passed, [2] xlb's but no socket is bound for the queue
// (passed to the kernel, or dropped on a link).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct ports {
	__u16 src;
	__u16 dst;
};

// IPv6 extension headers the filter walks before the transport header (xlb's parser walks up
// to 8; a longer chain to a VIP is steered for the parser to judge).
#define IPV6_EXTENSIONS 4

static always_inline int lookup(struct steer_key *key)
{
	return bpf_map_lookup_elem(&steer, key) != 0;
}

// Whether (addr, port, proto) matches as a destination or, with STEER_SOURCE, a source.
static always_inline int match(const __u8 *addr, int len, __u16 port, __u8 proto, __u8 flags)
{
	struct steer_key key = {};
	__builtin_memcpy(key.addr, addr, 4);
	if (len == 16)
		__builtin_memcpy(key.addr + 4, addr + 4, 12);
	key.port = port;
	key.proto = proto;
	key.flags = flags;
	if (lookup(&key))
		return 1;
	if (flags & STEER_SOURCE)
		return 0;
	key.port = 0;
	key.flags = flags | STEER_ANY_PORT;
	return lookup(&key);
}

// Whether `addr` is a Service's address: a malformed packet to it is xlb's to count.
static always_inline int vip_addr(const __u8 *addr, int len)
{
	struct steer_key key = {};
	__builtin_memcpy(key.addr, addr, 4);
	if (len == 16)
		__builtin_memcpy(key.addr + 4, addr + 4, 12);
	key.flags = STEER_VIP_ADDR | (len == 16 ? STEER_IPV6 : 0);
	return lookup(&key);
}

// A fragment after the first: xlb's if it goes to a Service's address or an SNAT address, or
// comes from a backend's address.
static always_inline int later_fragment(const __u8 *src, const __u8 *dst, int len, __u8 proto)
{
	__u8 fam = len == 16 ? STEER_IPV6 : 0;
	struct steer_key key = {};

	if (vip_addr(dst, len) || match(dst, len, 0, proto, fam))
		return 1;
	__builtin_memcpy(key.addr, src, 4);
	if (len == 16)
		__builtin_memcpy(key.addr + 4, src + 4, 12);
	key.flags = STEER_SOURCE | STEER_ANY_PORT | fam;
	return lookup(&key);
}

static always_inline int is_icmp_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == 3 || type == 11 || type == 12;
	return type >= 1 && type <= 4; // ICMPv6: unreachable, too big, time exceeded, param
}

// The quoted packet of an ICMP error: xlb's if its destination is a backend (an error about
// a forwarded packet) or its source is a Service or SNAT address (about a reply).
static always_inline int quoted_is_ours(void *q, void *end, int v6)
{
	__u8 proto;
	__u8 *src, *dst;
	int alen, hlen;
	__u8 fam = v6 ? STEER_IPV6 : 0;

	if (!v6) {
		struct iphdr *ip = q;
		if ((void *)(ip + 1) > end)
			return 0;
		hlen = ip->ihl * 4;
		if (hlen < 20)
			return 0;
		proto = ip->protocol;
		src = (__u8 *)&ip->saddr;
		dst = (__u8 *)&ip->daddr;
		alen = 4;
	} else {
		struct ipv6hdr *ip6 = q;
		if ((void *)(ip6 + 1) > end)
			return 0;
		hlen = sizeof(*ip6);
		proto = ip6->nexthdr;
		src = (__u8 *)&ip6->saddr;
		dst = (__u8 *)&ip6->daddr;
		alen = 16;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return 0;
	// The mask bounds the offset for the verifier (an IHL is at most 60 bytes).
	struct ports *p = q + (hlen & 0x3c);
	if ((void *)(p + 1) > end)
		return 0;
	return match(dst, alen, p->dst, proto, fam | STEER_SOURCE) ||
	       match(src, alen, p->src, proto, fam);
}

// 1: xlb's, 0: the kernel's, -1: the transport header is cut short.
static always_inline int steer_l4(void *l4, void *end, __u8 proto, __u8 *src, __u8 *dst,
				  int alen, int v6)
{
	__u8 fam = v6 ? STEER_IPV6 : 0;

	// SCTP's common header starts with its ports, as TCP's and UDP's headers do.
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		struct ports *p = l4;
		if ((void *)(p + 1) > end)
			return -1;
		return match(dst, alen, p->dst, proto, fam) ||
		       match(src, alen, p->src, proto, fam | STEER_SOURCE);
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		__u8 *icmp = l4;
		if ((void *)(icmp + 8) > end)
			return -1;
		if (is_icmp_error(proto, icmp[0]))
			return quoted_is_ours(icmp + 8, end, v6);
		// Echo request to a VIP, or an echo reply from a backend.
		return match(dst, alen, 0, proto, fam) ||
		       match(src, alen, 0, proto, fam | STEER_SOURCE);
	}
	return 0;
}

static always_inline int decide(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *l3 = eth + 1;
	__u16 type;

	if ((void *)(eth + 1) > end)
		return 0;
	type = eth->h_proto;
	if (type == __builtin_bswap16(ETH_P_8021Q)) {
		__u16 *vlan = l3;
		if ((void *)(vlan + 2) > end)
			return 0;
		type = vlan[1];
		l3 = vlan + 2;
	}
	if (type == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = l3;
		int verdict;
		if ((void *)(ip + 1) > end)
			return 0; // not even a destination to read
		if (ip->ihl < 5)
			return vip_addr((__u8 *)&ip->daddr, 4);
		// Fragments after the first carry no ports.
		if (ip->frag_off & __builtin_bswap16(0x1fff))
			return later_fragment((__u8 *)&ip->saddr, (__u8 *)&ip->daddr, 4, ip->protocol);
		// The mask bounds the offset for the verifier (an IHL is at most 60 bytes).
		verdict = steer_l4(l3 + ((ip->ihl * 4) & 0x3c), end, ip->protocol,
				   (__u8 *)&ip->saddr, (__u8 *)&ip->daddr, 4, 0);
		if (verdict < 0)
			return vip_addr((__u8 *)&ip->daddr, 4);
		return verdict;
	}
	if (type == __builtin_bswap16(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;
		__u8 *next;
		__u8 proto;
		int verdict;
		if ((void *)(ip6 + 1) > end)
			return 0;
		proto = ip6->nexthdr;
		next = (__u8 *)(ip6 + 1);
		// Extension headers (RFC 8200 section 4), as many as real traffic carries.
#pragma unroll
		for (int i = 0; i < IPV6_EXTENSIONS; i++) {
			if (proto != IPPROTO_HOPOPTS && proto != IPPROTO_ROUTING &&
			    proto != IPPROTO_DSTOPTS && proto != IPPROTO_FRAGMENT)
				break;
			if ((void *)(next + 8) > end)
				return vip_addr((__u8 *)&ip6->daddr, 16);
			if (proto == IPPROTO_FRAGMENT) {
				// Offset bits of a fragment header: after the first, no ports.
				if ((next[2] << 8 | next[3]) & 0xfff8)
					return later_fragment((__u8 *)&ip6->saddr, (__u8 *)&ip6->daddr, 16,
							      next[0]);
				proto = next[0];
				next += 8;
				continue;
			}
			// A routing header with segments left: the destination is a waypoint.
			if (proto == IPPROTO_ROUTING && next[3] != 0)
				return 0;
			proto = next[0];
			next += ((__u32)next[1] + 1) * 8;
		}
		if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING ||
		    proto == IPPROTO_DSTOPTS || proto == IPPROTO_FRAGMENT)
			return vip_addr((__u8 *)&ip6->daddr, 16); // longer than walked here
		verdict = steer_l4(next, end, proto, (__u8 *)&ip6->saddr, (__u8 *)&ip6->daddr, 16, 1);
		if (verdict < 0)
			return vip_addr((__u8 *)&ip6->daddr, 16);
		return verdict;
	}
	return 0;
}

// On a link: every unicast IP packet (multicast, and IPv6 from link-local addresses —
// neighbour discovery, MLD — stay the kernel's).
static always_inline int link_unicast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return 0;
		__u8 first = ((__u8 *)&ip->daddr)[0];
		return first < 224 && ip->daddr != 0xffffffff;
	}
	if (eth->h_proto == __builtin_bswap16(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return 0;
		__u8 *src = (__u8 *)&ip6->saddr;
		__u8 *dst = (__u8 *)&ip6->daddr;
		return dst[0] != 0xff && !(src[0] == 0xfe && (src[1] & 0xc0) == 0x80);
	}
	return 0;
}

SEC("xdp")
int xlb_filter(struct xdp_md *ctx)
{
	__u32 slot = 1;
	__u32 ingress = ctx->ingress_ifindex;
	int link = bpf_map_lookup_elem(&link_ports, &ingress) != 0;
	int ours = link ? link_unicast(ctx) : decide(ctx);
	long action = XDP_PASS;

	if (ours) {
		__u32 *base = bpf_map_lookup_elem(&port_base, &ingress);
		// When no socket is bound to this port and queue (xlb is restarting): on an ordinary
		// port XDP_PASS, so the kernel keeps working; on a link, whose traffic the kernel
		// routed there for xlb, XDP_DROP, so that it is retransmitted when xlb is back
		// instead of being routed by the kernel as if xlb were not there.
		long fallback = link ? XDP_DROP : XDP_PASS;
		slot = 2;
		action = fallback;
		if (base && ctx->rx_queue_index < XSK_QUEUES) {
			action = bpf_redirect_map(&xsks, *base + ctx->rx_queue_index, fallback);
			if (action == XDP_REDIRECT)
				slot = 0;
		}
	}
	__u64 *count = bpf_map_lookup_elem(&stats, &slot);
	if (count)
		*count += 1;
	return action;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
