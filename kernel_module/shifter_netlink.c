// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the "shifter" generic netlink family.
 *
 * The commands, attributes and errors are documented in
 * include/uapi/linux/shifter.h and described for tools in
 * Documentation/netlink/specs/shifter.yaml.  Each command has a policy of
 * its own, and the generic netlink core validates every request strictly
 * against it before the command runs, so a command never sees an
 * attribute that is not its own; the checks that a policy cannot express
 * (an address as long as its family says) are made below.  Every command
 * needs CAP_NET_ADMIN in the user namespace that owns the network
 * namespace of the requesting socket (GENL_UNS_ADMIN_PERM), and acts on
 * that namespace only; the commands that enable recording need it in the
 * initial user namespace too, unless the module parameter userns is set.
 */

#include <linux/err.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/kernel.h>
#include <linux/netdevice.h>
#include <linux/socket.h>
#include <net/genetlink.h>
#include <net/netlink.h>

#include "shifter_net.h"
#include "shifter_hooks.h"
#include "shifter_netlink.h"
#include "shifter_ports.h"
#include "shifter_table.h"

/* An address of either family; its own family's length is checked later. */
static int shifter_validate_addr(const struct nlattr *attr,
				 struct netlink_ext_ack *extack)
{
	if (nla_len(attr) != sizeof(struct in_addr) &&
	    nla_len(attr) != sizeof(struct in6_addr)) {
		NL_SET_ERR_MSG_ATTR(extack, attr,
				    "address is neither 4 nor 16 bytes long");
		return -EINVAL;
	}
	return 0;
}

static const struct nla_policy shifter_ports_policy[SHIFTER_A_PORTS_MAX + 1] = {
	[SHIFTER_A_PORTS_PORT]	= NLA_POLICY_MIN(NLA_U16, 1),
};

static const struct nla_policy shifter_get_policy[SHIFTER_A_MAX + 1] = {
	[SHIFTER_A_FAMILY]	= { .type = NLA_U8 },
	[SHIFTER_A_SRC_ADDR]	= NLA_POLICY_VALIDATE_FN(NLA_BINARY,
							 shifter_validate_addr),
	[SHIFTER_A_SRC_PORT]	= NLA_POLICY_MIN(NLA_U16, 1),
	[SHIFTER_A_LOCAL_ADDR]	= NLA_POLICY_VALIDATE_FN(NLA_BINARY,
							 shifter_validate_addr),
	[SHIFTER_A_LOCAL_PORT]	= NLA_POLICY_MIN(NLA_U16, 1),
};

static const struct nla_policy shifter_set_ports_policy[SHIFTER_A_MAX + 1] = {
	[SHIFTER_A_PORTS]	= NLA_POLICY_NESTED(shifter_ports_policy),
};

/* An interface index is an int. */
static struct netlink_range_validation shifter_ifindex_range = {
	.max	= INT_MAX,
};

static const struct nla_policy shifter_enable_policy[SHIFTER_A_MAX + 1] = {
	[SHIFTER_A_PORTS]	= NLA_POLICY_NESTED(shifter_ports_policy),
	[SHIFTER_A_IFINDEX]	= NLA_POLICY_FULL_RANGE(NLA_U32,
							&shifter_ifindex_range),
};

/* For the commands that take no attribute: each one is refused. */
static const struct nla_policy shifter_empty_policy[SHIFTER_A_MAX + 1];

static struct genl_family shifter_genl_family;

static unsigned int shifter_addr_len(u8 family)
{
	switch (family) {
	case AF_INET:
		return sizeof(struct in_addr);
	case AF_INET6:
		return sizeof(struct in6_addr);
	default:
		return 0;
	}
}

static int shifter_get_addr(struct genl_info *info, int type,
			    unsigned int len, union nf_inet_addr *addr)
{
	const struct nlattr *attr = info->attrs[type];

	if (nla_len(attr) != len) {
		NL_SET_ERR_MSG_ATTR(info->extack, attr,
				    "address length does not match the family");
		return -EINVAL;
	}
	memcpy(addr, nla_data(attr), len);
	return 0;
}

static int shifter_put_addr(struct sk_buff *msg, int addr_type, int port_type,
			    unsigned int len, const union nf_inet_addr *addr,
			    __be16 port)
{
	if (nla_put(msg, addr_type, len, addr) ||
	    nla_put_u16(msg, port_type, ntohs(port)))
		return -EMSGSIZE;
	return 0;
}

static int shifter_genl_get(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	struct shifter_table *table;
	struct shifter_dest dest;
	struct shifter_key key;
	struct sk_buff *msg;
	unsigned int len;
	bool enabled;
	void *hdr;
	int ret;

	if (GENL_REQ_ATTR_CHECK(info, SHIFTER_A_FAMILY) ||
	    GENL_REQ_ATTR_CHECK(info, SHIFTER_A_SRC_ADDR) ||
	    GENL_REQ_ATTR_CHECK(info, SHIFTER_A_SRC_PORT) ||
	    GENL_REQ_ATTR_CHECK(info, SHIFTER_A_LOCAL_ADDR) ||
	    GENL_REQ_ATTR_CHECK(info, SHIFTER_A_LOCAL_PORT))
		return -EINVAL;

	memset(&key, 0, sizeof(key));
	key.family = nla_get_u8(info->attrs[SHIFTER_A_FAMILY]);
	len = shifter_addr_len(key.family);
	if (!len) {
		NL_SET_ERR_MSG_ATTR(info->extack, info->attrs[SHIFTER_A_FAMILY],
				    "family is neither AF_INET nor AF_INET6");
		return -EINVAL;
	}
	ret = shifter_get_addr(info, SHIFTER_A_SRC_ADDR, len, &key.peer);
	if (ret)
		return ret;
	ret = shifter_get_addr(info, SHIFTER_A_LOCAL_ADDR, len, &key.local);
	if (ret)
		return ret;
	key.peer_port = htons(nla_get_u16(info->attrs[SHIFTER_A_SRC_PORT]));
	key.local_port = htons(nla_get_u16(info->attrs[SHIFTER_A_LOCAL_PORT]));

	atomic64_inc(&sn->stats.lookups);
	rcu_read_lock();
	table = rcu_dereference(sn->table);
	enabled = table;
	ret = table ? shifter_table_lookup(table, &key, &dest) : -ENOENT;
	rcu_read_unlock();
	if (ret == -ENOTUNIQ) {
		atomic64_inc(&sn->stats.ambiguous);
		NL_SET_ERR_MSG(info->extack,
			       "live connections in two conntrack zones share these ends");
		return ret;
	}
	if (ret) {
		atomic64_inc(&sn->stats.misses);
		if (enabled)
			NL_SET_ERR_MSG(info->extack,
				       "no record of this connection");
		else
			NL_SET_ERR_MSG(info->extack,
				       "not enabled in this network namespace");
		return ret;
	}
	atomic64_inc(&sn->stats.hits);

	msg = genlmsg_new(nla_total_size(sizeof(u8)) +
			  3 * nla_total_size(sizeof(struct in6_addr)) +
			  3 * nla_total_size(sizeof(u16)), GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put_reply(msg, info, &shifter_genl_family, 0,
				SHIFTER_CMD_GET);
	if (!hdr)
		goto err_msgsize;
	if (nla_put_u8(msg, SHIFTER_A_FAMILY, key.family) ||
	    shifter_put_addr(msg, SHIFTER_A_SRC_ADDR, SHIFTER_A_SRC_PORT, len,
			     &key.peer, key.peer_port) ||
	    shifter_put_addr(msg, SHIFTER_A_LOCAL_ADDR, SHIFTER_A_LOCAL_PORT,
			     len, &key.local, key.local_port) ||
	    shifter_put_addr(msg, SHIFTER_A_DST_ADDR, SHIFTER_A_DST_PORT, len,
			     &dest.addr, dest.port))
		goto err_msgsize;
	genlmsg_end(msg, hdr);
	return genlmsg_reply(msg, info);

err_msgsize:
	nlmsg_free(msg);
	return -EMSGSIZE;
}

static u64 shifter_entries(struct shifter_net *sn)
{
	struct shifter_table *table;
	u64 entries = 0;

	rcu_read_lock();
	table = rcu_dereference(sn->table);
	if (table)
		entries = shifter_table_count(table);
	rcu_read_unlock();
	return entries;
}

static int shifter_genl_stats(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	struct shifter_stats *stats = &sn->stats;
	const struct {
		int type;
		u64 value;
	} stat[] = {
		{ SHIFTER_STAT_ENTRIES, shifter_entries(sn) },
		{ SHIFTER_STAT_INSERTS, atomic64_read(&stats->inserts) },
		{ SHIFTER_STAT_LOOKUPS, atomic64_read(&stats->lookups) },
		{ SHIFTER_STAT_HITS, atomic64_read(&stats->hits) },
		{ SHIFTER_STAT_MISSES, atomic64_read(&stats->misses) },
		{ SHIFTER_STAT_EXPIRIES, atomic64_read(&stats->expiries) },
		{ SHIFTER_STAT_GONE, atomic64_read(&stats->gone) },
		{ SHIFTER_STAT_FULL, atomic64_read(&stats->full) },
		{ SHIFTER_STAT_AMBIGUOUS, atomic64_read(&stats->ambiguous) },
		{ SHIFTER_STAT_SKIPPED, atomic64_read(&stats->skipped) },
		{ SHIFTER_STAT_EVICTED_GONE, atomic64_read(&stats->evicted_gone) },
		{ SHIFTER_STAT_EVICTED_ANSWERED,
		  atomic64_read(&stats->evicted_answered) },
		{ SHIFTER_STAT_EVICTED_EARLY, atomic64_read(&stats->evicted_early) },
		{ SHIFTER_STAT_EVICTED_OLDEST,
		  atomic64_read(&stats->evicted_oldest) },
	};
	struct nlattr *nest;
	struct sk_buff *msg;
	unsigned int i;
	void *hdr;

	msg = genlmsg_new(nla_total_size(0) +
			  ARRAY_SIZE(stat) * nla_total_size_64bit(sizeof(u64)),
			  GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put_reply(msg, info, &shifter_genl_family, 0,
				SHIFTER_CMD_STATS);
	if (!hdr)
		goto err_msgsize;
	nest = nla_nest_start(msg, SHIFTER_A_STATS);
	if (!nest)
		goto err_msgsize;
	for (i = 0; i < ARRAY_SIZE(stat); i++) {
		if (nla_put_u64_64bit(msg, stat[i].type, stat[i].value,
				      SHIFTER_STAT_PAD))
			goto err_msgsize;
	}
	nla_nest_end(msg, nest);
	genlmsg_end(msg, hdr);
	return genlmsg_reply(msg, info);

err_msgsize:
	nlmsg_free(msg);
	return -EMSGSIZE;
}

static int shifter_genl_get_config(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	u16 port[SHIFTER_MAX_PORTS];
	unsigned int count, i;
	struct nlattr *nest;
	struct sk_buff *msg;
	bool enabled;
	void *hdr;

	count = shifter_ports_get(sn, port);
	enabled = !!rcu_access_pointer(sn->table);
	msg = genlmsg_new(nla_total_size(sizeof(u8)) +
			  nla_total_size(sizeof(u32)) + nla_total_size(0) +
			  count * nla_total_size(sizeof(u16)), GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put_reply(msg, info, &shifter_genl_family, 0,
				SHIFTER_CMD_GET_CONFIG);
	if (!hdr)
		goto err_msgsize;
	if (nla_put_u8(msg, SHIFTER_A_ENABLED, enabled) ||
	    nla_put_u32(msg, SHIFTER_A_IFINDEX, READ_ONCE(sn->ifindex)))
		goto err_msgsize;
	nest = nla_nest_start(msg, SHIFTER_A_PORTS);
	if (!nest)
		goto err_msgsize;
	for (i = 0; i < count; i++) {
		if (nla_put_u16(msg, SHIFTER_A_PORTS_PORT, port[i]))
			goto err_msgsize;
	}
	nla_nest_end(msg, nest);
	genlmsg_end(msg, hdr);
	return genlmsg_reply(msg, info);

err_msgsize:
	nlmsg_free(msg);
	return -EMSGSIZE;
}

/* The ports of a SHIFTER_A_PORTS nest, each already checked by policy. */
static struct shifter_ports *shifter_parse_ports(const struct nlattr *nest,
						 struct netlink_ext_ack *extack)
{
	u16 port[SHIFTER_MAX_PORTS];
	unsigned int count = 0;
	struct nlattr *attr;
	int rem;

	nla_for_each_nested(attr, nest, rem) {
		if (count == SHIFTER_MAX_PORTS) {
			NL_SET_ERR_MSG_ATTR(extack, attr, "too many ports");
			return ERR_PTR(-EINVAL);
		}
		port[count++] = nla_get_u16(attr);
	}
	return shifter_ports_new(port, count);
}

/*
 * Whether the requester may enable recording: a table takes room, which
 * only the initial user namespace's admins hand out unless the module
 * parameter userns lets each network namespace's own admins do it.
 */
static int shifter_may_enable(struct sk_buff *skb, struct genl_info *info)
{
	if (shifter_userns || netlink_capable(skb, CAP_NET_ADMIN))
		return 0;
	NL_SET_ERR_MSG(info->extack,
		       "enabling needs CAP_NET_ADMIN in the initial user namespace (module parameter userns)");
	return -EPERM;
}

/*
 * Enables @sn if it is not yet, then applies the settings given; on an
 * error nothing has changed.
 */
static int shifter_configure(struct shifter_net *sn,
			     struct shifter_ports *ports,
			     const int *ifindex)
{
	int ret;

	mutex_lock(&sn->lock);
	ret = shifter_hooks_enable(sn);
	if (ret) {
		mutex_unlock(&sn->lock);
		kfree(ports);
		return ret;
	}
	if (ports)
		shifter_ports_replace(sn, ports);
	if (ifindex)
		WRITE_ONCE(sn->ifindex, *ifindex);
	mutex_unlock(&sn->lock);
	return 0;
}

static int shifter_genl_set_ports(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	struct shifter_ports *ports;
	int ret;

	ret = shifter_may_enable(skb, info);
	if (ret)
		return ret;
	if (GENL_REQ_ATTR_CHECK(info, SHIFTER_A_PORTS))
		return -EINVAL;
	ports = shifter_parse_ports(info->attrs[SHIFTER_A_PORTS], info->extack);
	if (IS_ERR(ports))
		return PTR_ERR(ports);
	return shifter_configure(sn, ports, NULL);
}

static int shifter_genl_enable(struct sk_buff *skb, struct genl_info *info)
{
	struct net *net = genl_info_net(info);
	struct shifter_net *sn = shifter_pernet(net);
	struct shifter_ports *ports = NULL;
	const struct nlattr *attr;
	bool found;
	int ifindex;
	int ret;

	ret = shifter_may_enable(skb, info);
	if (ret)
		return ret;
	attr = info->attrs[SHIFTER_A_IFINDEX];
	if (attr) {
		/* The policy keeps it within an int. */
		ifindex = nla_get_u32(attr);
		rcu_read_lock();
		found = !ifindex || dev_get_by_index_rcu(net, ifindex);
		rcu_read_unlock();
		if (!found) {
			NL_SET_ERR_MSG_ATTR(info->extack, attr,
					    "no such interface in this network namespace");
			return -ENODEV;
		}
	}
	if (info->attrs[SHIFTER_A_PORTS]) {
		ports = shifter_parse_ports(info->attrs[SHIFTER_A_PORTS],
					    info->extack);
		if (IS_ERR(ports))
			return PTR_ERR(ports);
	}
	return shifter_configure(sn, ports, attr ? &ifindex : NULL);
}

static int shifter_genl_disable(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));

	mutex_lock(&sn->lock);
	shifter_hooks_disable(sn);
	mutex_unlock(&sn->lock);
	return 0;
}

static const struct genl_ops shifter_genl_ops[] = {
	{
		.cmd		= SHIFTER_CMD_GET,
		.doit		= shifter_genl_get,
		.policy		= shifter_get_policy,
		.maxattr	= ARRAY_SIZE(shifter_get_policy) - 1,
		.flags		= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd		= SHIFTER_CMD_STATS,
		.doit		= shifter_genl_stats,
		.policy		= shifter_empty_policy,
		.maxattr	= ARRAY_SIZE(shifter_empty_policy) - 1,
		.flags		= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd		= SHIFTER_CMD_GET_CONFIG,
		.doit		= shifter_genl_get_config,
		.policy		= shifter_empty_policy,
		.maxattr	= ARRAY_SIZE(shifter_empty_policy) - 1,
		.flags		= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd		= SHIFTER_CMD_SET_PORTS,
		.doit		= shifter_genl_set_ports,
		.policy		= shifter_set_ports_policy,
		.maxattr	= ARRAY_SIZE(shifter_set_ports_policy) - 1,
		.flags		= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd		= SHIFTER_CMD_ENABLE,
		.doit		= shifter_genl_enable,
		.policy		= shifter_enable_policy,
		.maxattr	= ARRAY_SIZE(shifter_enable_policy) - 1,
		.flags		= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd		= SHIFTER_CMD_DISABLE,
		.doit		= shifter_genl_disable,
		.policy		= shifter_empty_policy,
		.maxattr	= ARRAY_SIZE(shifter_empty_policy) - 1,
		.flags		= GENL_UNS_ADMIN_PERM,
	},
};

static struct genl_family shifter_genl_family __ro_after_init = {
	.name		= SHIFTER_GENL_NAME,
	.version	= SHIFTER_GENL_VERSION,
	.netnsok	= true,
	.parallel_ops	= true,
	.ops		= shifter_genl_ops,
	.n_ops		= ARRAY_SIZE(shifter_genl_ops),
	.module		= THIS_MODULE,
};

int __init shifter_genl_init(void)
{
	return genl_register_family(&shifter_genl_family);
}

void shifter_genl_exit(void)
{
	genl_unregister_family(&shifter_genl_family);
}
