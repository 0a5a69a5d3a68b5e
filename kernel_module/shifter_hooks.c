// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: recording in the namespaces that enabled it.
 *
 * A namespace that enables the module gets a table, a conntrack reference
 * (nf_ct_netns_get(), so conntrack tracks there) and one hook per family
 * at LOCAL_IN; one that never does costs nothing per packet.
 *
 * The hook runs just before conntrack confirms a new connection
 * (NF_IP_PRI_CONNTRACK_CONFIRM - 1): after every NAT hook and chain,
 * whatever their priorities, so the connection's tuples are final, and
 * after the filter chains, so most SYNs that are going to be dropped
 * already have been.  Only connections that reach a local socket pass
 * LOCAL_IN, so a gateway's forwarded traffic and its own outgoing
 * connections are never recorded.  A packet is recorded when it opened a
 * TCP connection with a SYN (conntrack says SYN_SENT, not a connection
 * picked up mid-stream), destination NAT changed the connection's
 * destination, the original destination port is watched, and, if the
 * namespace names an interface, the SYN arrived on it (the loopback
 * device for local programs' connections redirected in nat OUTPUT).
 * The hook never drops or changes a packet.
 */

#include <linux/netdevice.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/skbuff.h>
#include <net/netfilter/nf_conntrack.h>

#include "shifter_net.h"
#include "shifter_hooks.h"
#include "shifter_ports.h"
#include "shifter_table.h"

#define SHIFTER_HOOK_PRIORITY	(NF_IP_PRI_CONNTRACK_CONFIRM - 1)

static_assert((int)NF_IP6_PRI_LAST == (int)NF_IP_PRI_CONNTRACK_CONFIRM);

static unsigned int shifter_hook(void *priv, struct sk_buff *skb,
				 const struct nf_hook_state *state)
{
	const struct nf_conntrack_tuple *orig;
	enum ip_conntrack_info ctinfo;
	struct shifter_table *table;
	struct shifter_net *sn;
	struct nf_conn *ct;
	int ifindex;

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || ctinfo != IP_CT_NEW || nf_ct_protonum(ct) != IPPROTO_TCP)
		return NF_ACCEPT;
	if (!test_bit(IPS_DST_NAT_BIT, &ct->status))
		return NF_ACCEPT;
	if (READ_ONCE(ct->proto.tcp.state) != TCP_CONNTRACK_SYN_SENT)
		return NF_ACCEPT;

	sn = shifter_pernet(state->net);
	table = rcu_dereference(sn->table);
	if (!table)
		return NF_ACCEPT;
	ifindex = READ_ONCE(sn->ifindex);
	if (ifindex && (!state->in || state->in->ifindex != ifindex))
		return NF_ACCEPT;
	orig = &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;
	if (!shifter_ports_watched(sn, ntohs(orig->dst.u.tcp.port)))
		return NF_ACCEPT;

	shifter_table_record(table, ct);
	return NF_ACCEPT;
}

static const struct nf_hook_ops shifter_nf_ops[] = {
	{
		.hook		= shifter_hook,
		.pf		= NFPROTO_IPV4,
		.hooknum	= NF_INET_LOCAL_IN,
		.priority	= SHIFTER_HOOK_PRIORITY,
	},
	{
		.hook		= shifter_hook,
		.pf		= NFPROTO_IPV6,
		.hooknum	= NF_INET_LOCAL_IN,
		.priority	= SHIFTER_HOOK_PRIORITY,
	},
};

/* Called under sn->lock. */
int shifter_hooks_enable(struct shifter_net *sn)
{
	struct shifter_table *table;
	int ret;

	if (rcu_access_pointer(sn->table))
		return 0;
	table = shifter_table_new(sn);
	if (!table)
		return -ENOMEM;
	ret = nf_ct_netns_get(sn->net, NFPROTO_INET);
	if (ret)
		goto err_table;
	rcu_assign_pointer(sn->table, table);
	ret = nf_register_net_hooks(sn->net, shifter_nf_ops,
				    ARRAY_SIZE(shifter_nf_ops));
	if (ret)
		goto err_conntrack;
	return 0;

err_conntrack:
	RCU_INIT_POINTER(sn->table, NULL);
	/*
	 * nf_register_net_hooks() took back the hooks it had registered, but
	 * one may still be running on another CPU, and a look-up may hold
	 * the table.
	 */
	synchronize_net();
	nf_ct_netns_put(sn->net, NFPROTO_INET);
err_table:
	shifter_table_free(table);
	return ret;
}

/* Called under sn->lock. */
void shifter_hooks_disable(struct shifter_net *sn)
{
	struct shifter_table *table;

	table = rcu_dereference_protected(sn->table,
					  lockdep_is_held(&sn->lock));
	if (!table)
		return;
	nf_unregister_net_hooks(sn->net, shifter_nf_ops,
				ARRAY_SIZE(shifter_nf_ops));
	RCU_INIT_POINTER(sn->table, NULL);
	/* No hook and no look-up sees the table after this. */
	synchronize_net();
	shifter_table_free(table);
	nf_ct_netns_put(sn->net, NFPROTO_INET);
}

/*
 * A namespace going away: its hooks go first; the core waits for an RCU
 * grace period before shifter_hooks_net_exit().  No socket, so no
 * command, is left in the namespace.
 */
void shifter_hooks_net_pre_exit(struct shifter_net *sn)
{
	if (rcu_access_pointer(sn->table))
		nf_unregister_net_hooks(sn->net, shifter_nf_ops,
					ARRAY_SIZE(shifter_nf_ops));
}

void shifter_hooks_net_exit(struct shifter_net *sn)
{
	struct shifter_table *table;

	table = rcu_dereference_protected(sn->table, true);
	if (!table)
		return;
	RCU_INIT_POINTER(sn->table, NULL);
	shifter_table_free(table);
	nf_ct_netns_put(sn->net, NFPROTO_INET);
}
