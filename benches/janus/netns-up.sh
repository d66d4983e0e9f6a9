#!/bin/bash
# Create an isolated network namespace "mcbench" whose only addresses are loopback-range:
#   lo      127.0.0.1/8   (Janus never gathers ICE candidates on IFF_LOOPBACK interfaces)
#   mcj0    127.0.0.2/32  (one end of a veth pair; NOT flagged loopback, so Janus/libnice
#                          gathers a host candidate on it; traffic to it is still delivered locally)
set -e
NS=${NS:-mcbench}
ip netns add $NS
ip -n $NS link set lo up
ip -n $NS link add mcj0 type veth peer name mcj1
ip -n $NS addr add 127.0.0.2/32 dev mcj0
ip -n $NS link set mcj1 up
ip -n $NS link set mcj0 up
ip -n $NS -br addr
