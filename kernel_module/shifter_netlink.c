// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the "shifter" generic netlink family.
 *
 * The commands, attributes and errors are documented in
 * include/uapi/linux/shifter.h.  Every request is validated strictly
 * against shifter_genl_policy by the generic netlink core before it gets
 * here; the checks that a policy cannot express (an address as long as
 * its family says, a port other than 0) are made below.  Every command
 * needs CAP_NET_ADMIN in the user namespace that owns the network
 * namespace of the requesting socket, and sees only that namespace.
 */

#include <linux/in.h>
#include <linux/in6.h>
#include <linux/kernel.h>
#include <linux/socket.h>
#include <net/genetlink.h>
#include <net/netlink.h>

#include "shifter_net.h"
#include "shifter_netlink.h"
#include "shifter_ports.h"
#include "shifter_table.h"

static const struct nla_policy shifter_ports_policy[SHIFTER_A_PORTS_MAX + 1] = {
	[SHIFTER_A_PORTS_PORT]	= { .type = NLA_U16 },
};

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

static const struct nla_policy shifter_genl_policy[SHIFTER_A_MAX + 1] = {
	[SHIFTER_A_FAMILY]	= { .type = NLA_U8 },
	[SHIFTER_A_SRC_ADDR]	= NLA_POLICY_VALIDATE_FN(NLA_BINARY,
							 shifter_validate_addr),
	[SHIFTER_A_SRC_PORT]	= { .type = NLA_U16 },
	/* Attributes of replies only. */
	[SHIFTER_A_DST_ADDR]	= { .type = NLA_REJECT },
	[SHIFTER_A_DST_PORT]	= { .type = NLA_REJECT },
	[SHIFTER_A_STATS]	= { .type = NLA_REJECT },
	[SHIFTER_A_PORTS]	= NLA_POLICY_NESTED(shifter_ports_policy),
	[SHIFTER_A_PAD]		= { .type = NLA_REJECT },
};

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

static int shifter_put_tuple(struct sk_buff *msg, int addr_type,
			     int port_type, const struct shifter_tuple *tuple)
{
	unsigned int len = shifter_addr_len(tuple->family);

	if (nla_put(msg, addr_type, len, &tuple->addr) ||
	    nla_put_u16(msg, port_type, ntohs(tuple->port)))
		return -EMSGSIZE;
	return 0;
}

static int shifter_genl_get(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	struct shifter_tuple src, dst;
	struct nlattr *addr;
	struct sk_buff *msg;
	unsigned int len;
	void *hdr;
	u8 family;

	if (GENL_REQ_ATTR_CHECK(info, SHIFTER_A_FAMILY) ||
	    GENL_REQ_ATTR_CHECK(info, SHIFTER_A_SRC_ADDR) ||
	    GENL_REQ_ATTR_CHECK(info, SHIFTER_A_SRC_PORT))
		return -EINVAL;

	family = nla_get_u8(info->attrs[SHIFTER_A_FAMILY]);
	len = shifter_addr_len(family);
	if (!len) {
		NL_SET_ERR_MSG_ATTR(info->extack, info->attrs[SHIFTER_A_FAMILY],
				    "family is neither AF_INET nor AF_INET6");
		return -EINVAL;
	}
	addr = info->attrs[SHIFTER_A_SRC_ADDR];
	if (nla_len(addr) != len) {
		NL_SET_ERR_MSG_ATTR(info->extack, addr,
				    "address length does not match the family");
		return -EINVAL;
	}
	shifter_tuple_set(&src, family, nla_data(addr),
			  htons(nla_get_u16(info->attrs[SHIFTER_A_SRC_PORT])));

	if (!shifter_table_lookup(sn, &src, &dst))
		return -ENOENT;

	msg = genlmsg_new(nla_total_size(sizeof(u8)) +
			  2 * nla_total_size(sizeof(struct in6_addr)) +
			  2 * nla_total_size(sizeof(u16)), GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put_reply(msg, info, &shifter_genl_family, 0,
				SHIFTER_CMD_GET);
	if (!hdr)
		goto err_msgsize;
	if (nla_put_u8(msg, SHIFTER_A_FAMILY, family) ||
	    shifter_put_tuple(msg, SHIFTER_A_SRC_ADDR, SHIFTER_A_SRC_PORT,
			      &src) ||
	    shifter_put_tuple(msg, SHIFTER_A_DST_ADDR, SHIFTER_A_DST_PORT,
			      &dst))
		goto err_msgsize;
	genlmsg_end(msg, hdr);
	return genlmsg_reply(msg, info);

err_msgsize:
	nlmsg_free(msg);
	return -EMSGSIZE;
}

static int shifter_genl_stats(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	const struct {
		int type;
		u64 value;
	} stat[] = {
		{ SHIFTER_STAT_ENTRIES, shifter_table_count(sn) },
		{ SHIFTER_STAT_INSERTS, atomic64_read(&sn->inserts) },
		{ SHIFTER_STAT_LOOKUPS, atomic64_read(&sn->lookups) },
		{ SHIFTER_STAT_HITS, atomic64_read(&sn->hits) },
		{ SHIFTER_STAT_MISSES, atomic64_read(&sn->misses) },
		{ SHIFTER_STAT_EVICTIONS, atomic64_read(&sn->evictions) },
		{ SHIFTER_STAT_EXPIRIES, atomic64_read(&sn->expiries) },
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

static int shifter_genl_get_ports(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	u16 port[SHIFTER_MAX_PORTS];
	unsigned int count, i;
	struct nlattr *nest;
	struct sk_buff *msg;
	void *hdr;

	count = shifter_ports_get(sn, port);
	msg = genlmsg_new(nla_total_size(0) +
			  count * nla_total_size(sizeof(u16)), GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put_reply(msg, info, &shifter_genl_family, 0,
				SHIFTER_CMD_GET_PORTS);
	if (!hdr)
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

static int shifter_genl_set_ports(struct sk_buff *skb, struct genl_info *info)
{
	struct shifter_net *sn = shifter_pernet(genl_info_net(info));
	u16 port[SHIFTER_MAX_PORTS];
	unsigned int count = 0;
	struct nlattr *attr;
	int rem;

	if (GENL_REQ_ATTR_CHECK(info, SHIFTER_A_PORTS))
		return -EINVAL;

	nla_for_each_nested(attr, info->attrs[SHIFTER_A_PORTS], rem) {
		if (nla_type(attr) != SHIFTER_A_PORTS_PORT) {
			NL_SET_ERR_MSG_ATTR(info->extack, attr,
					    "unexpected attribute in the ports");
			return -EINVAL;
		}
		if (count == SHIFTER_MAX_PORTS) {
			NL_SET_ERR_MSG_ATTR(info->extack, attr,
					    "too many ports");
			return -EINVAL;
		}
		port[count] = nla_get_u16(attr);
		if (!port[count]) {
			NL_SET_ERR_MSG_ATTR(info->extack, attr,
					    "port 0 cannot be watched");
			return -EINVAL;
		}
		count++;
	}
	return shifter_ports_set(sn, port, count);
}

static const struct genl_small_ops shifter_genl_ops[] = {
	{
		.cmd	= SHIFTER_CMD_GET,
		.doit	= shifter_genl_get,
		.flags	= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd	= SHIFTER_CMD_STATS,
		.doit	= shifter_genl_stats,
		.flags	= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd	= SHIFTER_CMD_GET_PORTS,
		.doit	= shifter_genl_get_ports,
		.flags	= GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd	= SHIFTER_CMD_SET_PORTS,
		.doit	= shifter_genl_set_ports,
		.flags	= GENL_UNS_ADMIN_PERM,
	},
};

static struct genl_family shifter_genl_family __ro_after_init = {
	.name		= SHIFTER_GENL_NAME,
	.version	= SHIFTER_GENL_VERSION,
	.maxattr	= SHIFTER_A_MAX,
	.policy		= shifter_genl_policy,
	.netnsok	= true,
	.parallel_ops	= true,
	.small_ops	= shifter_genl_ops,
	.n_small_ops	= ARRAY_SIZE(shifter_genl_ops),
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
