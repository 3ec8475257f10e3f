# Sourced by the demo and the end-to-end benchmark: the network-namespace topology.
#
#   $P-client: c0 198.18.0.1/24 and 2001:2::1/64, default routes via the node
#   $P-node:   n0 198.18.0.254/24 and 2001:2::fe/64; n<i> 198.18.(128+i).254/24 and
#              2001:2:0:(80+i)::fe/64 for each backend
#   $P-b<i>:   b0 198.18.(128+i).1/24 and 2001:2:0:(80+i)::1/64, default routes via the node
#
# Only 198.18.0.0/15 and 2001:2::/48 addresses, all inside the namespaces; nothing is routed
# from the root namespace. The node neither forwards IPv4 nor IPv6. `topology_down` removes every namespace with the prefix (and so their veths and
# any XDP program on them) and kills what runs in them.

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# topology_up PREFIX BACKENDS: builds it; sets IFACES to the node's interfaces ("n0, n1, ...").
topology_up() {
  local p=$1 backends=$2 i ns net
  ip netns add "$p-node"; ip netns add "$p-client"
  in_ns "$p-node" sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
  in_ns "$p-node" ip link set lo up; in_ns "$p-client" ip link set lo up
  ip link add c0 netns "$p-client" type veth peer name n0 netns "$p-node"
  in_ns "$p-client" ip addr add 198.18.0.1/24 dev c0
  in_ns "$p-node" ip addr add 198.18.0.254/24 dev n0
  in_ns "$p-client" ip addr add 2001:2::1/64 dev c0 nodad
  in_ns "$p-node" ip addr add 2001:2::fe/64 dev n0 nodad
  in_ns "$p-client" ip link set c0 up; in_ns "$p-node" ip link set n0 up
  in_ns "$p-client" ip route add default via 198.18.0.254
  in_ns "$p-client" ip -6 route add default via 2001:2::fe
  IFACES=n0
  for i in $(seq 1 "$backends"); do
    ns=$p-b$i net=198.18.$((128 + i))
    ip netns add "$ns"; in_ns "$ns" ip link set lo up
    ip link add b0 netns "$ns" type veth peer name "n$i" netns "$p-node"
    in_ns "$ns" ip addr add "$net.1/24" dev b0
    in_ns "$p-node" ip addr add "$net.254/24" dev "n$i"
    in_ns "$ns" ip addr add "2001:2:0:$((80 + i))::1/64" dev b0 nodad
    in_ns "$p-node" ip addr add "2001:2:0:$((80 + i))::fe/64" dev "n$i" nodad
    in_ns "$ns" ip link set b0 up; in_ns "$p-node" ip link set "n$i" up
    in_ns "$ns" ip route add default via "$net.254"
    in_ns "$ns" ip -6 route add default via "2001:2:0:$((80 + i))::fe"
    IFACES="$IFACES, n$i"
  done
}

# topology_down PREFIX
topology_down() {
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep "^$1-"); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$ns"
  done
}
