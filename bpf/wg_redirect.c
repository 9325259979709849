// SPDX-License-Identifier: GPL-2.0
/*
 * wgmanager datapath: steer traffic for remote pods (and pods' traffic for remote nodes)
 * into the WireGuard device, and drop (never leak) what has no ready peer.
 *
 * Two entry points share one set of maps:
 *   to_underlay  tc egress of every device a packet leaves the node by: the uplink (routed
 *                CNIs) and the CNI's VXLAN device (overlays; it sees the inner packet);
 *                to_tunnel_l3 is the same on devices with no link-layer header (IPIP). This
 *                is the steering point: it runs after netfilter (FORWARD, POSTROUTING,
 *                kube-proxy's DNAT and SNAT, NetworkPolicy engines) and after the CNI's
 *                routing decision, so the cluster's rules apply to encrypted traffic exactly
 *                as to plaintext. Every source is steered to a remote pod CIDR: pods, the
 *                host, ICMP errors, replies that netfilter reverse-NATed to a node address.
 *   from_pod     tc ingress of a pod's host-side veth: the old fast path, opt-in only
 *                (--pod-interfaces). It redirects before routing and netfilter, so the
 *                sending node's iptables rules never see those packets.
 *
 * Remote node addresses are in the map too, flagged ACTION_NODE: only packets from a local
 * pod address are steered by them (pod -> remote node: a hostPort, a NodePort, a reply to a
 * masqueraded connection). Host traffic to node addresses, WireGuard's own UDP included,
 * always passes: the tunnel never carries itself and the control plane never depends on it.
 *
 * The cidrs map is an LPM trie over IPv6 keys; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d,
 * prefix + 96), so one lookup serves both families and the cost stays flat in its size.
 * Built by bcc with -DWGM_PIN_DIR="/sys/fs/bpf/..." -DWGM_MAX_CIDRS=N; maps are pinned there
 * so a restarted agent reuses them (and their entries) with no gap.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#ifndef WGM_PIN_DIR
#error "WGM_PIN_DIR must be defined (a bpffs directory)"
#endif
#ifndef WGM_MAX_CIDRS
#define WGM_MAX_CIDRS 65536
#endif

/* Map values; keep in step with wgmanager.core.model.Action. */
#define ACTION_LOCAL 1
#define ACTION_REDIRECT 2
#define ACTION_DROP 3
/* Key rotation (wgmanager.core.rotation): the node runs a second device with its next key.
 * ALT sends into that device; BOTH sends a copy into each, and the peer accepts exactly the
 * one encrypted with the key it currently holds for us. */
#define ACTION_REDIRECT_ALT 4
#define ACTION_REDIRECT_BOTH 5
/* Flag on an entry for a remote node's own address (a /32 or /128): steered (with the
 * action in the low bits) only when the source is a local pod. */
#define ACTION_NODE 0x10

/* Counter slots; keep in step with wgmanager.datapath.bpf.Counter. */
#define CNT_PASSED 0
#define CNT_REDIRECTED 1
#define CNT_DROPPED_NOT_READY 2
#define CNT_DROPPED_NO_DEVICE 3
#define CNT_OVERSIZE 4
#define CNT_MAX 5

struct cidr_key {
    u32 prefixlen;
    u8 addr[16];
};

struct cidr_value {
    u32 action;
};

struct wgm_config {
    u32 wg_ifindex;  /* 0 = no device yet: redirects become drops */
    u32 wg_port;     /* informational (status); the program never exempts by port */
    u32 wg_mtu;      /* for the oversize counter */
    u32 alt_ifindex; /* the second device during a key rotation; 0 = none (ALT uses wg) */
};

struct counter {
    u64 packets;
    u64 bytes;
};

BPF_TABLE_PINNED("lpm_trie", struct cidr_key, struct cidr_value, cidrs, WGM_MAX_CIDRS,
                 WGM_PIN_DIR "/cidrs", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct wgm_config, config, 1, WGM_PIN_DIR "/config");
BPF_TABLE_PINNED("percpu_array", u32, struct counter, counters, CNT_MAX,
                 WGM_PIN_DIR "/counters");

struct flow {
    struct cidr_key src;
    struct cidr_key dst;
};

static __always_inline void count(u32 slot, struct __sk_buff *skb)
{
    struct counter *c = counters.lookup(&slot);
    if (c) {
        c->packets += 1;
        c->bytes += skb->len;
    }
}

/* Fills flow from an IP header at p (proto: its ethertype); 0 for IPv4/IPv6, -1 otherwise.
 * Only addresses are read: no verdict depends on ports, so IPv4 options, fragments and
 * IPv6 extension headers cannot steer a packet around the program. */
static __always_inline int parse_ip(void *p, void *data_end, __be16 proto, struct flow *f)
{
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = p;
        if ((void *)(ip + 1) > data_end)
            return -1;
        f->src.prefixlen = 128;
        f->dst.prefixlen = 128;
        f->src.addr[10] = 0xff;
        f->src.addr[11] = 0xff;
        f->dst.addr[10] = 0xff;
        f->dst.addr[11] = 0xff;
        __builtin_memcpy(&f->src.addr[12], &ip->saddr, 4);
        __builtin_memcpy(&f->dst.addr[12], &ip->daddr, 4);
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = p;
        if ((void *)(ip6 + 1) > data_end)
            return -1;
        f->src.prefixlen = 128;
        f->dst.prefixlen = 128;
        __builtin_memcpy(f->src.addr, &ip6->saddr, 16);
        __builtin_memcpy(f->dst.addr, &ip6->daddr, 16);
    } else {
        return -1;
    }
    return 0;
}

/* An Ethernet frame: veths, the uplink, VXLAN and Geneve devices. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return -1;
    return parse_ip(eth + 1, data_end, eth->h_proto, f);
}

/* A device with no link-layer header (IPIP's tunl0, sit, ip6tnl, L3 GRE): the packet
 * starts at the IP header and skb->protocol says which. */
static __always_inline int parse_l3(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    return parse_ip(data, data_end, skb->protocol, f);
}

static __always_inline int steer(struct __sk_buff *skb, u32 action)
{
    u32 zero = 0;
    struct wgm_config *cfg;
    u32 target, alt;

    if (action != ACTION_REDIRECT && action != ACTION_REDIRECT_ALT &&
        action != ACTION_REDIRECT_BOTH) {
        count(CNT_DROPPED_NOT_READY, skb);
        return TC_ACT_SHOT;
    }
    cfg = config.lookup(&zero);
    if (!cfg) {
        count(CNT_DROPPED_NO_DEVICE, skb);
        return TC_ACT_SHOT;
    }
    /* With no second device, ALT means the current one: at the end of a rotation the
     * device config switches before the entries are rewritten, and nothing may drop. */
    alt = cfg->alt_ifindex ? cfg->alt_ifindex : cfg->wg_ifindex;
    target = action == ACTION_REDIRECT ? cfg->wg_ifindex : alt;
    if (target == 0) {
        count(CNT_DROPPED_NO_DEVICE, skb);
        return TC_ACT_SHOT;
    }
    /* GSO packets (a TCP burst of up to 64 KiB) are segmented to the pod's MSS on the
     * way into the device: only a single packet over the MTU is really oversize. */
    if (cfg->wg_mtu && skb->gso_segs <= 1 && skb->len > cfg->wg_mtu + ETH_HLEN)
        count(CNT_OVERSIZE, skb);
    count(CNT_REDIRECTED, skb);
    if (action == ACTION_REDIRECT_BOTH && cfg->wg_ifindex && cfg->wg_ifindex != target)
        bpf_clone_redirect(skb, cfg->wg_ifindex, 0);
    /* If the device vanished (wireguard-go restarting) the redirect drops: fail closed. */
    return bpf_redirect(target, 0);
}

int from_pod(struct __sk_buff *skb)
{
    struct flow f = {};
    struct cidr_value *dst;

    if (parse(skb, &f) < 0)
        goto pass;
    dst = cidrs.lookup(&f.dst);
    if (!dst || dst->action == ACTION_LOCAL)
        goto pass;
    /* The source is a pod (this is its veth): node entries apply as they are. */
    return steer(skb, dst->action & ~ACTION_NODE);
pass:
    count(CNT_PASSED, skb);
    return TC_ACT_OK;
}

/* The egress verdict, shared by the uplink (and L2 tunnels) and L3 tunnel devices. */
static __always_inline int egress(struct __sk_buff *skb, struct flow *f)
{
    struct cidr_value *src, *dst;
    u32 action;

    dst = cidrs.lookup(&f->dst);
    if (!dst || dst->action == ACTION_LOCAL)
        goto pass;
    action = dst->action;
    if (action & ACTION_NODE) {
        /* A remote node's address: only a local pod's packets are ours. The host's own
         * traffic (our encrypted WireGuard packets, the kubelet, the API server) passes. */
        src = cidrs.lookup(&f->src);
        if (!src || src->action != ACTION_LOCAL)
            goto pass;
        action &= ~ACTION_NODE;
    }
    /* A remote pod CIDR: whatever the source (a pod, the host, an ICMP error quoting a
     * pod's packet, a reply whose source netfilter rewrote to this node's address). */
    return steer(skb, action);
pass:
    count(CNT_PASSED, skb);
    return TC_ACT_OK;
}

int to_underlay(struct __sk_buff *skb)
{
    struct flow f = {};

    if (parse(skb, &f) < 0) {
        count(CNT_PASSED, skb);
        return TC_ACT_OK;
    }
    return egress(skb, &f);
}

int to_tunnel_l3(struct __sk_buff *skb)
{
    struct flow f = {};

    if (parse_l3(skb, &f) < 0) {
        count(CNT_PASSED, skb);
        return TC_ACT_OK;
    }
    return egress(skb, &f);
}
