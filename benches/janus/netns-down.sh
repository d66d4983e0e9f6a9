#!/bin/bash
NS=${NS:-mcbench}
ip netns del $NS   # also deletes the veth pair living inside it
