#!/usr/bin/env bash
# A cluster of N "nodes" on one machine: network namespaces joined by veth pairs through a bridge,
# for multi-node tests and for trying deployments. Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN).
#
#   netns.sh up N [--delay 50us] [--rate 25gbit]   create efn1..efnN (and the switch efsw)
#   netns.sh down                                  remove them
#   netns.sh netem [--delay D] [--rate R] | off    change the links' netem on every node
#   netns.sh link NODE up|down                     take a node's link down (a partition)
#   netns.sh hostfile RANKS_PER_NODE               print an Open MPI hostfile for the nodes
#   netns.sh exec NODE CMD...                      run CMD inside NODE (its network and hostname)
#   netns.sh mpirun ARGS...                        mpirun from node 1 across every node, MPI and
#                                                  UCX over TCP on the nodes' subnet
#   netns.sh check                                 exit 0 when namespaces can be created here
#
# Addresses: node i is 198.18.0.i/24 on its eth0 (198.18.0.0/15, RFC 2544's benchmarking range).
# They exist only inside the namespaces: the bridge lives in a namespace of its own (efsw) with no
# address, no namespace has a default route, and nothing is attached to the root namespace, so no
# packet can leave the nodes' subnet. Each node also gets its own hostname (a UTS namespace per
# command), as separate machines have.
#
# Why a hostname per node: Open MPI 4.1's daemon writes the hwloc topology into a shared-memory
# file under its session directory, /tmp/ompi.<hostname>.<uid>/jf.<jobfamily>/hwloc.sm
# (rtc/hwloc, hwloc_shmem_topology_write). Daemons in namespaces that share the host's hostname
# and /tmp open and write the same file at once, and one of them segfaults (seen in about one
# launch in ten). A hostname per node gives each daemon its own session directory, and
# rtc_hwloc_vmhole=none (set by `mpirun` here) turns the shared topology off altogether, so the
# crash cannot come back through another shared path.
#
# Environment: EF_NETNS_PREFIX (default efn) names the nodes; the switch is ${prefix}sw.
set -euo pipefail
PREFIX=${EF_NETNS_PREFIX:-efn}
SW=${PREFIX}sw
SUBNET=198.18.0.0/24
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=/run/expertflow-netns/$PREFIX

die() {
  echo "netns.sh: $*" >&2
  exit 1
}
nodes() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" | sort -V || true; }
num_nodes() { nodes | wc -l; }

# Applies (or clears) netem on every node's eth0: each direction of a link gets the delay, so a
# round trip between two nodes takes twice it.
set_netem() {
  local delay=$1 rate=$2 n
  for n in $(nodes); do
    ip netns exec "$n" tc qdisc del dev eth0 root 2>/dev/null || true
    if [ -n "$delay$rate" ]; then
      local args=()
      [ -n "$delay" ] && args+=(delay "$delay")
      [ -n "$rate" ] && args+=(rate "$rate")
      ip netns exec "$n" tc qdisc add dev eth0 root netem limit 100000 "${args[@]}"
    fi
  done
}

parse_netem() {
  DELAY="" RATE=""
  while [ $# -gt 0 ]; do
    case $1 in
      --delay) DELAY=$2; shift 2 ;;
      --rate) RATE=$2; shift 2 ;;
      *) die "unknown option $1 (expected --delay D, --rate R)" ;;
    esac
  done
}

cmd_up() {
  local n=${1:-}
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 250 ] || die "up: give the number of nodes, 1..250"
  shift
  parse_netem "$@"
  [ -z "$(nodes)" ] || die "nodes $(nodes | tr '\n' ' ')exist already; run 'netns.sh down' first"
  ip netns add "$SW"
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  ip -n "$SW" link set lo up
  local i
  for i in $(seq 1 "$n"); do
    local node=$PREFIX$i
    ip netns add "$node"
    ip -n "$SW" link add "p$i" type veth peer name eth0 netns "$node"
    ip -n "$SW" link set "p$i" master br0 up
    ip -n "$node" link set lo up
    ip -n "$node" addr add "198.18.0.$i/24" dev eth0
    ip -n "$node" link set eth0 up
    # A peer behind a dead link: give up on unacknowledged TCP data after ~13 s (5 retries)
    # rather than the default ~15 min, so mpirun's daemons notice a partition. Per namespace.
    ip netns exec "$node" sysctl -qw net.ipv4.tcp_retries2=5
  done
  set_netem "$DELAY" "$RATE"
  mkdir -p "$STATE"
  echo "$n" >"$STATE/nodes"
  echo "nodes: $(nodes | tr '\n' ' ')(198.18.0.1-$n on eth0, switch $SW)${DELAY:+, delay $DELAY}${RATE:+, rate $RATE}"
}

cmd_down() {
  local n
  for n in $(nodes); do ip netns del "$n"; done
  ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$SW" && ip netns del "$SW"
  rm -rf "$STATE"
}

# Runs a command inside a node with the node's name as hostname. Used as Open MPI's rsh agent too:
# there it gets "NODE word word..." and, like ssh, runs the words through a shell.
cmd_exec() {
  local node=$1
  shift
  nodes | grep -qx "$node" || die "no node '$node' (nodes: $(nodes | tr '\n' ' '))"
  exec ip netns exec "$node" unshare --uts sh -c 'echo "$0" >/proc/sys/kernel/hostname && exec "$@"' "$node" "$@"
}

cmd_rsh() {
  local node=$1
  shift
  # A node whose link (or switch port) is down would take the daemon mpirun starts there, which
  # then cannot call back, and mpirun would wait for it forever: refuse it up front instead, which
  # mpirun reports as a daemon that failed to start.
  local link
  link=$(ip -n "$node" -o link show eth0 2>/dev/null) || die "no node '$node' (nodes: $(nodes | tr '\n' ' '))"
  if [[ $link != *"state UP"* || $link == *NO-CARRIER* ]]; then
    die "node '$node' does not answer: its link is down ($(sed -E 's/.*<([^>]*)>.*state ([A-Z]+).*/<\1> state \2/' <<<"$link"))"
  fi
  cmd_exec "$node" sh -c "$*"
}

cmd_hostfile() {
  local per=${1:-1} n
  for n in $(nodes); do echo "$n slots=$per"; done
}

# mpirun from node 1. The hostfile is written unless the arguments name one. Open MPI's MCA
# settings: TCP only, on the nodes' subnet; our rsh agent; no tree spawn (every daemon is
# started from node 1); no shared hwloc topology (see the header).
cmd_mpirun() {
  [ "$(num_nodes)" -ge 1 ] || die "no nodes; run 'netns.sh up N' first"
  local first
  first=$(nodes | head -1)
  local args=("$@") hostfile=()
  if ! printf '%s\n' "$@" | grep -qE '^(--hostfile|-hostfile|--machinefile|-H|--host)$'; then
    mkdir -p "$STATE"
    cmd_hostfile "${EF_NETNS_RANKS_PER_NODE:-1}" >"$STATE/hostfile"
    hostfile=(--hostfile "$STATE/hostfile")
  fi
  export OMPI_MCA_plm_rsh_agent="$HERE/netns.sh rsh"
  export OMPI_MCA_plm_rsh_no_tree_spawn=1
  export OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=$SUBNET OMPI_MCA_oob_tcp_if_include=$SUBNET
  export OMPI_MCA_pml=ob1 OMPI_MCA_osc=^ucx
  export OMPI_MCA_rtc_hwloc_vmhole=none
  # mpirun notices a daemon behind a dead link in ~11 s (default: 300 s + 9 x 20 s), and then ends
  # the job; the ranks themselves do not wait for this (comm::MpiContext's deadlines).
  export OMPI_MCA_oob_tcp_keepalive_time=5 OMPI_MCA_oob_tcp_keepalive_intvl=2 OMPI_MCA_oob_tcp_keepalive_probes=3
  export UCX_TLS=${UCX_TLS:-tcp,self} UCX_NET_DEVICES=${UCX_NET_DEVICES:-eth0}
  cmd_exec "$first" mpirun "${hostfile[@]}" -x UCX_TLS -x UCX_NET_DEVICES "${args[@]}"
}

# Whether this machine can create network namespaces and veth pairs (prints the reason if not).
cmd_check() {
  local probe=${PREFIX}probe$$
  if [ "$(id -u)" != 0 ]; then
    echo "not root: network namespaces need root"
    return 1
  fi
  command -v ip >/dev/null && command -v unshare >/dev/null || {
    echo "ip (iproute2) or unshare (util-linux) is missing"
    return 1
  }
  if ! err=$(ip netns add "$probe" 2>&1); then
    echo "cannot create a network namespace: $err"
    return 1
  fi
  local ok=0
  if ! err=$(ip -n "$probe" link add ef0 type veth peer name ef1 2>&1); then
    echo "cannot create a veth pair: $err"
    ok=1
  elif ! err=$(ip netns exec "$probe" unshare --uts true 2>&1); then
    echo "cannot create a UTS namespace: $err"
    ok=1
  fi
  ip netns del "$probe"
  return $ok
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  netem)
    shift
    if [ "${1:-}" = off ]; then set_netem "" ""; else parse_netem "$@"; set_netem "$DELAY" "$RATE"; fi ;;
  link)
    [ $# -eq 3 ] || die "link NODE up|down"
    ip -n "$2" link set eth0 "$3" ;;
  hostfile) shift; cmd_hostfile "$@" ;;
  exec) shift; [ $# -ge 2 ] || die "exec NODE CMD..."; cmd_exec "$@" ;;
  rsh) shift; cmd_rsh "$@" ;;
  mpirun) shift; cmd_mpirun "$@" ;;
  check) cmd_check ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
