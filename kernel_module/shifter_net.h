/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: per-namespace state and the module parameters.
 *
 * Each network namespace has a struct shifter_net (through net_generic()):
 * its watched ports, its view of the connection table and its counters.
 * The table itself is global and keyed on the namespace too; see
 * shifter_table.c.
 */

#ifndef _SHIFTER_NET_H
#define _SHIFTER_NET_H

#include <linux/atomic.h>
#include <linux/list.h>
#include <linux/rcupdate.h>
#include <linux/types.h>
#include <linux/workqueue.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <uapi/linux/shifter.h>

/* Module parameters, read-only once the module is loaded. */
extern unsigned int shifter_max_entries;
extern unsigned int shifter_expiry_secs;
extern unsigned short shifter_default_ports[SHIFTER_MAX_PORTS];
extern unsigned int shifter_default_nports;

/* The watched destination ports of one namespace, replaced as a whole. */
struct shifter_ports {
	struct rcu_head rcu;
	unsigned int count;
	u16 port[SHIFTER_MAX_PORTS];
};

struct shifter_net {
	struct net *net;
	struct shifter_ports __rcu *ports;

	/* Entries of this namespace, oldest first; under shifter_table_lock. */
	struct list_head lru;
	unsigned int count;
	struct delayed_work gc;

	atomic64_t inserts;
	atomic64_t lookups;
	atomic64_t hits;
	atomic64_t misses;
	atomic64_t evictions;
	atomic64_t expiries;
};

extern unsigned int shifter_net_id;

static inline struct shifter_net *shifter_pernet(const struct net *net)
{
	return net_generic(net, shifter_net_id);
}

#endif /* _SHIFTER_NET_H */
