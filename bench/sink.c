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
