// SPDX-License-Identifier: GPL-2.0
// The end-to-end benchmark's backend: an XDP program that counts (the veth's xdp_drops
// statistic) and drops every IPv4 UDP packet, and passes the rest (ARP above all), so that
// the backend's own receive stack is not what limits or loads the node under test.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>

__attribute__((section("xdp"), used)) int sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > end || eth->h_proto != __builtin_bswap16(ETH_P_IP))
		return XDP_PASS;
	return ip->protocol == IPPROTO_UDP ? XDP_DROP : XDP_PASS;
}

char LICENSE[] __attribute__((section("license"), used)) = "GPL";

// The same backend answering instead: every IPv4 UDP packet goes back where it came from,
// Ethernet and IP addresses and UDP ports swapped (the checksums stay valid: both sums are
// sums of the same words). The benchmark's "replies" rows use it, so that the node under
// test translates the request and its response.
__attribute__((section("xdp_reflect"), used)) int reflect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	unsigned char mac[ETH_ALEN];
	__u32 addr;
	__u16 port;

	if ((void *)(ip + 1) > end || eth->h_proto != __builtin_bswap16(ETH_P_IP) ||
	    ip->protocol != IPPROTO_UDP || ip->ihl != 5)
		return XDP_PASS;
	__u16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > end)
		return XDP_PASS;
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	port = ports[0];
	ports[0] = ports[1];
	ports[1] = port;
	return XDP_TX;
}

// On the node's backend-facing veths, for the kernel's dataplanes in the "replies" rows: a
// veth takes the reflector's XDP_TX frames only when it has an XDP program of its own (with
// GRO alone its ring filled after 256 frames and was never drained, here); this one passes
// every frame to the kernel. xlb and the bare forwarder bring their own.
__attribute__((section("xdp_pass"), used)) int pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
