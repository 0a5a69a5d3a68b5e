/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: per-namespace state and the module parameters.
 *
 * Every network namespace has a struct shifter_net (through net_generic()),
 * a few dozen bytes: its settings and counters.  Only a namespace that
 * enabled the module has hooks and a table; see shifter_hooks.c and
 * shifter_table.c.
 */

#ifndef _SHIFTER_NET_H
#define _SHIFTER_NET_H

#include <linux/atomic.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/types.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <uapi/linux/shifter.h>

/* Module parameters, read-only once the module is loaded. */
extern unsigned int shifter_max_entries;
extern unsigned int shifter_max_entries_total;
extern unsigned int shifter_max_entries_userns;
extern unsigned int shifter_max_entries_userns_total;
extern bool shifter_userns;
extern unsigned int shifter_expiry_secs;
extern unsigned short shifter_default_ports[SHIFTER_MAX_PORTS];
extern unsigned int shifter_default_nports;

struct shifter_ports;
struct shifter_table;

struct shifter_stats {
	atomic64_t inserts;
	atomic64_t lookups;
	atomic64_t hits;
	atomic64_t misses;
	atomic64_t expiries;
	atomic64_t gone;
	atomic64_t full;
	atomic64_t ambiguous;
	atomic64_t skipped;
	atomic64_t evicted_gone;
	atomic64_t evicted_answered;
	atomic64_t evicted_early;
	atomic64_t evicted_oldest;
};

struct shifter_net {
	struct net *net;

	/* Serialises enabling, disabling and changes of the settings. */
	struct mutex lock;

	/* The watched ports; NULL for the module parameter's. */
	struct shifter_ports __rcu *ports;

	/* The table, while the namespace records; NULL otherwise. */
	struct shifter_table __rcu *table;

	/*
	 * Record only SYNs that arrived on this interface; 0 for any,
	 * SHIFTER_IFINDEX_GONE for none once the interface named went away
	 * (a later interface may reuse its index).
	 */
	int ifindex;

	struct shifter_stats stats;
};

#define SHIFTER_IFINDEX_GONE	(-1)

extern unsigned int shifter_net_id;

static inline struct shifter_net *shifter_pernet(const struct net *net)
{
	return net_generic(net, shifter_net_id);
}

#endif /* _SHIFTER_NET_H */
