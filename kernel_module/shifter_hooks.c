// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the netfilter hooks that see TCP SYNs before NAT.
 *
 * In every namespace, hooks at PRE_ROUTING (connections passing through a
 * gateway) and LOCAL_OUT (connections of local clients), IPv4 and IPv6,
 * run just before destination NAT, so a SYN still carries the destination
 * its client meant.  A SYN without ACK to a watched port is recorded as
 *
 *	(family, source address, source port) -> (destination, port)
 *
 * Every header is read with skb_header_pointer(); a packet too short for
 * its headers, a fragment, or anything else odd is let through untouched
 * and unrecorded.  The hooks never drop or change a packet.
 *
 * A locally sent packet that NAT turned towards a local socket comes back
 * through PRE_ROUTING on the loopback device, already rewritten: it was
 * seen at LOCAL_OUT, so PRE_ROUTING ignores loopback devices.
 */

#include <linux/if.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/kernel.h>
#include <linux/netdevice.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/skbuff.h>
#include <linux/tcp.h>
#include <net/ip.h>
#include <net/ipv6.h>

#include "shifter_net.h"
#include "shifter_hooks.h"
#include "shifter_ports.h"
#include "shifter_table.h"

static bool shifter_from_loopback(const struct nf_hook_state *state)
{
	return state->hook == NF_INET_PRE_ROUTING && state->in &&
	       (state->in->flags & IFF_LOOPBACK);
}

static void shifter_tcp(struct net *net, const struct sk_buff *skb,
			unsigned int thoff, u8 family,
			const void *saddr, const void *daddr)
{
	struct shifter_tuple src, dst;
	const struct tcphdr *th;
	struct shifter_net *sn;
	struct tcphdr _th;

	th = skb_header_pointer(skb, thoff, sizeof(_th), &_th);
	if (!th || th->doff < sizeof(_th) / 4)
		return;
	if (!th->syn || th->ack || th->rst || th->fin)
		return;
	if (!th->source || !th->dest)
		return;

	sn = shifter_pernet(net);
	if (!shifter_ports_watched(sn, ntohs(th->dest)))
		return;

	shifter_tuple_set(&src, family, saddr, th->source);
	shifter_tuple_set(&dst, family, daddr, th->dest);
	shifter_table_insert(sn, &src, &dst);
}

static unsigned int shifter_hook_ipv4(void *priv, struct sk_buff *skb,
				      const struct nf_hook_state *state)
{
	unsigned int nhoff = skb_network_offset(skb);
	const struct iphdr *iph;
	struct iphdr _iph;
	unsigned int ihl;

	if (shifter_from_loopback(state))
		return NF_ACCEPT;

	iph = skb_header_pointer(skb, nhoff, sizeof(_iph), &_iph);
	if (!iph || iph->version != 4 || iph->protocol != IPPROTO_TCP)
		return NF_ACCEPT;
	ihl = iph->ihl * 4;
	if (ihl < sizeof(_iph) || ntohs(iph->tot_len) < ihl)
		return NF_ACCEPT;
	if (iph->frag_off & htons(IP_MF | IP_OFFSET))
		return NF_ACCEPT;

	shifter_tcp(state->net, skb, nhoff + ihl, AF_INET,
		    &iph->saddr, &iph->daddr);
	return NF_ACCEPT;
}

static unsigned int shifter_hook_ipv6(void *priv, struct sk_buff *skb,
				      const struct nf_hook_state *state)
{
	unsigned int nhoff = skb_network_offset(skb);
	const struct ipv6hdr *ip6h;
	struct ipv6hdr _ip6h;
	__be16 frag_off = 0;
	u8 nexthdr;
	int thoff;

	if (shifter_from_loopback(state))
		return NF_ACCEPT;

	ip6h = skb_header_pointer(skb, nhoff, sizeof(_ip6h), &_ip6h);
	if (!ip6h || ip6h->version != 6)
		return NF_ACCEPT;

	nexthdr = ip6h->nexthdr;
	thoff = ipv6_skip_exthdr(skb, nhoff + sizeof(_ip6h), &nexthdr,
				 &frag_off);
	if (thoff < 0 || nexthdr != IPPROTO_TCP || frag_off)
		return NF_ACCEPT;

	shifter_tcp(state->net, skb, thoff, AF_INET6,
		    &ip6h->saddr, &ip6h->daddr);
	return NF_ACCEPT;
}

static const struct nf_hook_ops shifter_nf_ops[] = {
	{
		.hook		= shifter_hook_ipv4,
		.pf		= NFPROTO_IPV4,
		.hooknum	= NF_INET_PRE_ROUTING,
		.priority	= NF_IP_PRI_NAT_DST - 1,
	},
	{
		.hook		= shifter_hook_ipv4,
		.pf		= NFPROTO_IPV4,
		.hooknum	= NF_INET_LOCAL_OUT,
		.priority	= NF_IP_PRI_NAT_DST - 1,
	},
	{
		.hook		= shifter_hook_ipv6,
		.pf		= NFPROTO_IPV6,
		.hooknum	= NF_INET_PRE_ROUTING,
		.priority	= NF_IP6_PRI_NAT_DST - 1,
	},
	{
		.hook		= shifter_hook_ipv6,
		.pf		= NFPROTO_IPV6,
		.hooknum	= NF_INET_LOCAL_OUT,
		.priority	= NF_IP6_PRI_NAT_DST - 1,
	},
};

int shifter_hooks_register(struct net *net)
{
	return nf_register_net_hooks(net, shifter_nf_ops,
				     ARRAY_SIZE(shifter_nf_ops));
}

void shifter_hooks_unregister(struct net *net)
{
	nf_unregister_net_hooks(net, shifter_nf_ops,
				ARRAY_SIZE(shifter_nf_ops));
}
