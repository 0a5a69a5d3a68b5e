// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the table of redirected connections of one namespace.
 *
 * Each namespace that records has a table of its own, made when it is
 * enabled and charged, with its entries, to the memory cgroup of the
 * process that enabled it.  An entry is filed under the connection's
 * reply tuple, the key the redirector asks with, in a bucket chosen by a
 * siphash keyed afresh for every table, so no one outside can aim at a
 * bucket.  Look-ups walk a bucket under RCU; writers take the table's
 * lock, with bottom halves off (the hook records from softirq), and free
 * entries after a grace period.
 *
 * Entries are told apart by key and conntrack zone: conntrack keeps reply
 * tuples unique per zone only (conntrack zones over VRFs with overlapping
 * addresses), so a second zone's connection with the same reply tuple gets
 * an entry of its own.  A look-up names no zone (the accepted socket
 * carries none), so while both connections live it is ambiguous and
 * answered -ENOTUNIQ: never the other zone's destination.
 *
 * An entry answers only while conntrack still holds the connection it was
 * made for: the look-up asks conntrack for the reply tuple and compares
 * the connection it finds with the original tuple recorded.  A SYN that
 * was dropped after the hook (by a later rule, or by conntrack itself
 * when it could not confirm the connection) leaves an entry that never
 * answers; a later connection that reuses the key replaces an entry whose
 * connection is gone, and never one whose connection is alive (that SYN
 * is counted as skipped: conntrack will not confirm it).
 *
 * Memory is bounded: max_entries per namespace, max_entries_total for all
 * namespaces owned by the initial user namespace, and SHIFTER_BUCKET_MAX
 * per bucket.  A namespace owned by any other user namespace (a container,
 * or an unprivileged user's unshare -Urn) has a smaller share,
 * max_entries_userns, taken from a room of its own, max_entries_userns_total,
 * so such namespaces together can never take the initial namespace's room.  A new connection is
 * never locked out by full room: one entry is evicted to make room, the
 * first kind found of, in this order, an entry whose connection conntrack
 * no longer holds, one already answered (the redirector asks once per
 * connection), one whose connection is not assured or is closing
 * (conntrack's own rule for early drop), and else the oldest.  A full
 * bucket chooses among its own entries; a full table among its
 * SHIFTER_EVICT_SCAN oldest, so a flood's entries, new and unassured,
 * go before an older connection that was answered or assured.
 *
 * A table starts with SHIFTER_BUCKETS_MIN chains (512 bytes), less than a
 * bare network namespace costs, and grows by SHIFTER_GROW_FACTOR when it
 * holds SHIFTER_GROW_LOAD entries a chain, up to max_entries / 4 chains,
 * in a work item: each entry has two chain nodes, so the new array is
 * linked through the other node while look-ups still walk the old one,
 * freed after a grace period.  While it is still growing a chain may hold
 * SHIFTER_BUCKET_MAX_GROWING entries, so a burst faster than the work
 * does not evict.
 *
 * Entries are kept in two lists in the order they were made: new ones,
 * and those checked once, past SHIFTER_GRACE, to have a connection in
 * conntrack.  A delayed work, queued only for when the next of them is
 * due, checks the new ones past their grace (dropping those conntrack
 * never confirmed) and drops the entries past expiry_secs: its work is
 * in proportion to the entries it moves or drops, and it is idle while
 * nothing is due.  An entry whose connection conntrack lets go later is
 * dropped when a look-up finds it gone, when room is needed, or at
 * expiry.
 */

#include <linux/bug.h>
#include <linux/jiffies.h>
#include <linux/log2.h>
#include <linux/memcontrol.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/overflow.h>
#include <linux/random.h>
#include <linux/rculist.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/siphash.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/user_namespace.h>
#include <linux/workqueue.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_core.h>
#include <net/netfilter/nf_conntrack_tuple.h>
#include <net/netfilter/nf_conntrack_zones.h>

#include "shifter_net.h"
#include "shifter_table.h"

#define SHIFTER_BUCKET_MAX	16
/* The longest chain while the table is still growing. */
#define SHIFTER_BUCKET_MAX_GROWING	64
#define SHIFTER_BUCKETS_MIN	64U
#define SHIFTER_BUCKETS_MAX	65536U
/* A growing table grows when it holds this many entries a chain, ... */
#define SHIFTER_GROW_LOAD	2
/* ... to this many times as many chains. */
#define SHIFTER_GROW_FACTOR	4
/* The most entries one run of the work moves or drops. */
#define SHIFTER_GC_BATCH	1024
/* How many of the oldest entries a full table chooses a victim among. */
#define SHIFTER_EVICT_SCAN	32
/* How long a new entry's connection may still wait for confirmation. */
#define SHIFTER_GRACE		HZ

struct shifter_entry {
	/*
	 * In its chain of the table's array, by the array's node (read under
	 * RCU), and while the table grows in the next array's too.
	 */
	struct hlist_node node[2];
	/* In the table's new or checked list, under the table's lock. */
	struct list_head age;
	struct shifter_key key;
	struct nf_conntrack_tuple orig;
	struct nf_conntrack_zone zone;
	unsigned long stamp;
	/* Set by the first look-up answered. */
	bool answered;
	struct rcu_head rcu;
};

/* Kinds of entry, best evicted first. */
enum shifter_victim {
	SHIFTER_VICTIM_GONE,
	SHIFTER_VICTIM_ANSWERED,
	SHIFTER_VICTIM_EARLY,
	SHIFTER_VICTIM_OLDEST,
};

struct shifter_table {
	struct shifter_net *sn;
	struct mem_cgroup *memcg;
	siphash_key_t hash_key;
	unsigned int mask;
	atomic_t count;
	/* This table's share, and the room it takes it from. */
	unsigned int max;
	struct shifter_room *room;
	/* Taken by every writer, with bottom halves off; readers use RCU. */
	spinlock_t lock;
	/* Entries not yet checked against conntrack, oldest first. */
	struct list_head fresh;
	/* Entries checked once, oldest first. */
	struct list_head checked;
	struct delayed_work gc;
	/* Whether, and for when, the work is queued; under the lock. */
	bool gc_armed;
	unsigned long gc_due;
	/* The chains, read under RCU, replaced by a larger array as it grows. */
	struct shifter_buckets __rcu *buckets;
	/* How many chains the table grows to, and whether it is growing. */
	unsigned int buckets_max;
	bool growing;
	struct work_struct grow;
};

/*
 * A power of two of chains, allocated on their own (an exact power of two
 * of bytes), and which of an entry's nodes links them.
 */
struct shifter_buckets {
	unsigned int mask;
	unsigned int node;
	struct hlist_head *chain;
};

/* The entry whose node @node (of @which) is, or NULL. */
static struct shifter_entry *shifter_node_entry(struct hlist_node *node,
						unsigned int which)
{
	return node ? container_of(node - which, struct shifter_entry, node[0]) :
		      NULL;
}

/* Each entry of a chain of @b, under the table's lock. */
#define shifter_chain_for_each(entry, b, chain)				\
	for (entry = shifter_node_entry((chain)->first, (b)->node); entry; \
	     entry = shifter_node_entry(entry->node[(b)->node].next, (b)->node))

/* The same, safe against the removal of @entry, using @next. */
#define shifter_chain_for_each_safe(entry, next, b, chain)		\
	for (entry = shifter_node_entry((chain)->first, (b)->node);	\
	     entry && ({ next = shifter_node_entry(entry->node[(b)->node].next, \
						   (b)->node); 1; });	\
	     entry = next)

/* Each entry of a chain of @b, under RCU. */
#define shifter_chain_for_each_rcu(entry, b, chain)			\
	for (entry = shifter_node_entry(rcu_dereference(hlist_first_rcu(chain)), \
					(b)->node);			\
	     entry;							\
	     entry = shifter_node_entry(					\
		rcu_dereference(hlist_next_rcu(&entry->node[(b)->node])), \
		(b)->node))

static_assert(sizeof(struct shifter_key) % sizeof(u32) == 0);

/* The entries of a kind of namespace, and their limit. */
struct shifter_room {
	atomic_t count;
	unsigned int max;
};

static struct kmem_cache *shifter_entry_cache __ro_after_init;
static unsigned long shifter_expiry __ro_after_init;
/* Namespaces owned by the initial user namespace, and all others. */
static struct shifter_room shifter_room_init;
static struct shifter_room shifter_room_userns;

static void shifter_key_from_ct(struct shifter_key *key,
				const struct nf_conn *ct)
{
	const struct nf_conntrack_tuple *reply =
		&ct->tuplehash[IP_CT_DIR_REPLY].tuple;

	memset(key, 0, sizeof(*key));
	key->family = nf_ct_l3num(ct);
	if (key->family == AF_INET) {
		key->peer.ip = reply->dst.u3.ip;
		key->local.ip = reply->src.u3.ip;
	} else {
		key->peer.in6 = reply->dst.u3.in6;
		key->local.in6 = reply->src.u3.in6;
	}
	key->peer_port = reply->dst.u.tcp.port;
	key->local_port = reply->src.u.tcp.port;
}

static void shifter_key_to_reply(const struct shifter_key *key,
				 struct nf_conntrack_tuple *reply)
{
	memset(reply, 0, sizeof(*reply));
	reply->src.l3num = key->family;
	reply->src.u3 = key->local;
	reply->src.u.tcp.port = key->local_port;
	reply->dst.u3 = key->peer;
	reply->dst.u.tcp.port = key->peer_port;
	reply->dst.protonum = IPPROTO_TCP;
	reply->dst.dir = IP_CT_DIR_REPLY;
}

static struct hlist_head *shifter_bucket(struct shifter_table *table,
					 struct shifter_buckets *b,
					 const struct shifter_key *key)
{
	u64 hash = siphash(key, sizeof(*key), &table->hash_key);

	return &b->chain[hash & b->mask];
}

/* The table's chains, under its lock. */
static struct shifter_buckets *shifter_locked_buckets(struct shifter_table *table)
{
	return rcu_dereference_protected(table->buckets,
					 lockdep_is_held(&table->lock));
}

static bool shifter_entry_expired(const struct shifter_entry *entry,
				  unsigned long now)
{
	return time_after_eq(now, entry->stamp + shifter_expiry);
}

static bool shifter_entry_young(const struct shifter_entry *entry,
				unsigned long now)
{
	return time_before(now, entry->stamp + SHIFTER_GRACE);
}

/*
 * Whether @entry is filed under @key in @zone.  Conntrack keeps a reply
 * tuple unique within a zone only (as seen in the reply direction): two
 * live connections in two zones may share one, and each gets an entry.
 */
static bool shifter_entry_same(const struct shifter_entry *entry,
			       const struct shifter_key *key,
			       const struct nf_conntrack_zone *zone)
{
	return !memcmp(&entry->key, key, sizeof(*key)) &&
	       nf_ct_zone_id(&entry->zone, IP_CT_DIR_REPLY) ==
	       nf_ct_zone_id(zone, IP_CT_DIR_REPLY);
}

/*
 * The connection conntrack holds under @entry's key and zone, with a
 * reference, if it is the very connection @entry was recorded for.
 */
static struct nf_conn *shifter_entry_ct(struct net *net,
					const struct shifter_entry *entry)
{
	const struct nf_conntrack_tuple_hash *h;
	struct nf_conntrack_tuple reply;
	struct nf_conn *ct;

	shifter_key_to_reply(&entry->key, &reply);
	h = nf_conntrack_find_get(net, &entry->zone, &reply);
	if (!h)
		return NULL;
	ct = nf_ct_tuplehash_to_ctrack(h);
	if (NF_CT_DIRECTION(h) == IP_CT_DIR_REPLY &&
	    nf_ct_tuple_equal(&entry->orig,
			      &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple))
		return ct;
	nf_ct_put(ct);
	return NULL;
}

/* Whether conntrack holds the very connection @entry was recorded for. */
static bool shifter_entry_live(struct net *net,
			       const struct shifter_entry *entry)
{
	struct nf_conn *ct = shifter_entry_ct(net, entry);

	if (!ct)
		return false;
	nf_ct_put(ct);
	return true;
}

/* Whether conntrack itself would drop @ct early to make room. */
static bool shifter_ct_early(const struct nf_conn *ct)
{
	if (!test_bit(IPS_ASSURED_BIT, &ct->status))
		return true;
	switch (READ_ONCE(ct->proto.tcp.state)) {
	case TCP_CONNTRACK_FIN_WAIT:
	case TCP_CONNTRACK_CLOSE_WAIT:
	case TCP_CONNTRACK_LAST_ACK:
	case TCP_CONNTRACK_TIME_WAIT:
	case TCP_CONNTRACK_CLOSE:
		return true;
	default:
		return false;
	}
}

/*
 * What kind of victim @entry would make.  A new entry whose connection
 * conntrack does not hold yet may still be waiting for confirmation: it
 * counts as unassured, not gone.
 */
static enum shifter_victim shifter_entry_victim(struct shifter_table *table,
						const struct shifter_entry *entry,
						unsigned long now)
{
	enum shifter_victim kind;
	struct nf_conn *ct;

	ct = shifter_entry_ct(table->sn->net, entry);
	if (!ct)
		return shifter_entry_young(entry, now) ?
		       SHIFTER_VICTIM_EARLY : SHIFTER_VICTIM_GONE;
	if (READ_ONCE(entry->answered))
		kind = SHIFTER_VICTIM_ANSWERED;
	else if (shifter_ct_early(ct))
		kind = SHIFTER_VICTIM_EARLY;
	else
		kind = SHIFTER_VICTIM_OLDEST;
	nf_ct_put(ct);
	return kind;
}

static void shifter_entry_free_rcu(struct rcu_head *head)
{
	kmem_cache_free(shifter_entry_cache,
			container_of(head, struct shifter_entry, rcu));
}

static bool shifter_reserve(struct shifter_table *table)
{
	if (atomic_inc_return(&table->count) > table->max)
		goto err_table;
	if (atomic_inc_return(&table->room->count) > table->room->max)
		goto err_total;
	return true;

err_total:
	atomic_dec(&table->room->count);
err_table:
	atomic_dec(&table->count);
	return false;
}

static void shifter_unreserve(struct shifter_table *table)
{
	atomic_dec(&table->room->count);
	atomic_dec(&table->count);
}

/* Called with the table's lock held. */
static void shifter_entry_del(struct shifter_table *table,
			      struct shifter_entry *entry)
{
	lockdep_assert_held(&table->lock);
	hlist_del_rcu(&entry->node[shifter_locked_buckets(table)->node]);
	list_del(&entry->age);
	shifter_unreserve(table);
	call_rcu(&entry->rcu, shifter_entry_free_rcu);
}

static void shifter_count_eviction(struct shifter_stats *stats,
				   enum shifter_victim kind)
{
	switch (kind) {
	case SHIFTER_VICTIM_GONE:
		atomic64_inc(&stats->evicted_gone);
		break;
	case SHIFTER_VICTIM_ANSWERED:
		atomic64_inc(&stats->evicted_answered);
		break;
	case SHIFTER_VICTIM_EARLY:
		atomic64_inc(&stats->evicted_early);
		break;
	case SHIFTER_VICTIM_OLDEST:
		atomic64_inc(&stats->evicted_oldest);
		break;
	}
}

/*
 * Whether @entry, of kind @kind, is a better victim than @best, of kind
 * @best_kind: a better kind, or the same kind and older.
 */
static bool shifter_better_victim(const struct shifter_entry *entry,
				  enum shifter_victim kind,
				  const struct shifter_entry *best,
				  enum shifter_victim best_kind)
{
	if (!best || kind != best_kind)
		return !best || kind < best_kind;
	return time_before(entry->stamp, best->stamp);
}

/* Evicts the best victim of @chain.  Called with the table's lock held. */
static void shifter_evict_chain(struct shifter_table *table,
				struct hlist_head *chain)
{
	struct shifter_buckets *b = shifter_locked_buckets(table);
	enum shifter_victim kind, best_kind = SHIFTER_VICTIM_OLDEST;
	struct shifter_entry *entry, *best = NULL;
	unsigned long now = jiffies;

	shifter_chain_for_each(entry, b, chain) {
		kind = shifter_entry_victim(table, entry, now);
		if (shifter_better_victim(entry, kind, best, best_kind)) {
			best = entry;
			best_kind = kind;
		}
	}
	if (best) {
		shifter_entry_del(table, best);
		shifter_count_eviction(&table->sn->stats, best_kind);
	}
}

/*
 * Evicts the best victim among the table's SHIFTER_EVICT_SCAN oldest
 * entries (the checked ones are older than the new ones); false if the
 * table is empty.  Called with the table's lock held.
 */
static bool shifter_evict_oldest(struct shifter_table *table)
{
	enum shifter_victim kind, best_kind = SHIFTER_VICTIM_OLDEST;
	struct list_head *lists[] = { &table->checked, &table->fresh };
	struct shifter_entry *entry, *best = NULL;
	unsigned long now = jiffies;
	unsigned int i, scanned = 0;

	for (i = 0; i < ARRAY_SIZE(lists); i++) {
		list_for_each_entry(entry, lists[i], age) {
			if (scanned++ == SHIFTER_EVICT_SCAN)
				goto scanned;
			kind = shifter_entry_victim(table, entry, now);
			if (shifter_better_victim(entry, kind, best, best_kind)) {
				best = entry;
				best_kind = kind;
				if (kind == SHIFTER_VICTIM_GONE)
					goto scanned;
			}
		}
	}
scanned:
	if (!best)
		return false;
	shifter_entry_del(table, best);
	shifter_count_eviction(&table->sn->stats, best_kind);
	return true;
}

/* When a new entry is due to be checked against conntrack. */
static unsigned long shifter_entry_checked_due(const struct shifter_entry *entry)
{
	return entry->stamp + min_t(unsigned long, SHIFTER_GRACE,
				    shifter_expiry);
}

/*
 * Whether the work has anything left to do, and when, in @due.  Called
 * with the table's lock held.
 */
static bool shifter_gc_due(struct shifter_table *table, unsigned long *due)
{
	struct shifter_entry *fresh, *checked;

	fresh = list_first_entry_or_null(&table->fresh, struct shifter_entry,
					 age);
	checked = list_first_entry_or_null(&table->checked,
					   struct shifter_entry, age);
	if (fresh)
		*due = shifter_entry_checked_due(fresh);
	if (checked && (!fresh ||
			time_before(checked->stamp + shifter_expiry, *due)))
		*due = checked->stamp + shifter_expiry;
	return fresh || checked;
}

/*
 * Wants the work at @due, unless it is already queued for sooner.  The
 * timer is set under the table's lock, with gc_due, so that two callers
 * (a record and the work re-arming itself) cannot leave it set for the
 * later of their times while gc_due says the sooner.  Called with the
 * table's lock held.
 */
static void shifter_gc_want(struct shifter_table *table, unsigned long due)
{
	long delay;

	lockdep_assert_held(&table->lock);
	if (table->gc_armed && !time_before(due, table->gc_due))
		return;
	table->gc_armed = true;
	table->gc_due = due;
	delay = (long)(due - jiffies);
	mod_delayed_work(system_power_efficient_wq, &table->gc, max(delay, 1L));
}

/*
 * Checks the new entries past their grace and drops the expired ones,
 * SHIFTER_GC_BATCH at most in one run, then sleeps until the next is due.
 */
static void shifter_table_gc(struct work_struct *work)
{
	struct shifter_table *table =
		container_of(to_delayed_work(work), struct shifter_table, gc);
	struct shifter_stats *stats = &table->sn->stats;
	struct shifter_entry *entry, *tmp;
	unsigned int budget = SHIFTER_GC_BATCH;
	unsigned long now = jiffies, due = now;

	spin_lock_bh(&table->lock);
	table->gc_armed = false;
	list_for_each_entry_safe(entry, tmp, &table->fresh, age) {
		if (!budget || (shifter_entry_young(entry, now) &&
				!shifter_entry_expired(entry, now)))
			break;
		budget--;
		if (shifter_entry_expired(entry, now)) {
			shifter_entry_del(table, entry);
			atomic64_inc(&stats->expiries);
		} else if (!shifter_entry_live(table->sn->net, entry)) {
			shifter_entry_del(table, entry);
			atomic64_inc(&stats->gone);
		} else {
			list_move_tail(&entry->age, &table->checked);
		}
	}
	list_for_each_entry_safe(entry, tmp, &table->checked, age) {
		if (!budget || !shifter_entry_expired(entry, now))
			break;
		budget--;
		shifter_entry_del(table, entry);
		atomic64_inc(&stats->expiries);
	}
	if (!budget) {
		/* More to do at once: let other work run in between. */
		shifter_gc_want(table, now);
	} else if (shifter_gc_due(table, &due)) {
		shifter_gc_want(table, due);
	}
	spin_unlock_bh(&table->lock);
}

/*
 * Records @ct, a new connection that destination NAT sent to this host;
 * called from the hook, in softirq or with bottom halves off, under RCU.
 */
void shifter_table_record(struct shifter_table *table, const struct nf_conn *ct)
{
	struct shifter_stats *stats = &table->sn->stats;
	struct shifter_entry *entry, *old, *same = NULL;
	struct mem_cgroup *old_memcg;
	struct shifter_buckets *b;
	struct hlist_head *chain;
	unsigned int chained = 0, chains;
	bool grow = false;

	/* Charged to the memory cgroup that enabled this namespace. */
	old_memcg = set_active_memcg(table->memcg);
	entry = kmem_cache_alloc(shifter_entry_cache,
				 GFP_ATOMIC | __GFP_ACCOUNT | __GFP_NOWARN);
	set_active_memcg(old_memcg);
	if (!entry) {
		atomic64_inc(&stats->full);
		return;
	}

	shifter_key_from_ct(&entry->key, ct);
	entry->orig = ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;
	entry->zone = *nf_ct_zone(ct);
	entry->stamp = jiffies;
	entry->answered = false;

	spin_lock_bh(&table->lock);
	b = shifter_locked_buckets(table);
	chains = b->mask + 1;
	chain = shifter_bucket(table, b, &entry->key);
	shifter_chain_for_each(old, b, chain) {
		chained++;
		if (shifter_entry_same(old, &entry->key, &entry->zone))
			same = old;
	}
	if (same) {
		if (nf_ct_tuple_equal(&same->orig, &entry->orig))
			/* The same connection's SYN, seen again. */
			goto err_locked;
		/*
		 * Conntrack confirms no second connection with a live one's
		 * reply tuple in one zone: this one's SYN is about to be
		 * dropped.
		 */
		if (shifter_entry_live(table->sn->net, same)) {
			atomic64_inc(&stats->skipped);
			goto err_locked;
		}
		shifter_entry_del(table, same);
		atomic64_inc(&stats->gone);
		chained--;
	}
	if (chained >= (chains < table->buckets_max ?
			SHIFTER_BUCKET_MAX_GROWING : SHIFTER_BUCKET_MAX))
		shifter_evict_chain(table, chain);
	while (!shifter_reserve(table)) {
		if (!shifter_evict_oldest(table)) {
			/* Others fill the room of all namespaces. */
			spin_unlock_bh(&table->lock);
			kmem_cache_free(shifter_entry_cache, entry);
			atomic64_inc(&stats->full);
			return;
		}
	}
	hlist_add_head_rcu(&entry->node[b->node], chain);
	list_add_tail(&entry->age, &table->fresh);
	shifter_gc_want(table, shifter_entry_checked_due(entry));
	if (!table->growing && chains < table->buckets_max &&
	    atomic_read(&table->count) > SHIFTER_GROW_LOAD * chains) {
		table->growing = true;
		grow = true;
	}
	spin_unlock_bh(&table->lock);

	atomic64_inc(&stats->inserts);
	if (grow)
		queue_work(system_power_efficient_wq, &table->grow);
	return;

err_locked:
	spin_unlock_bh(&table->lock);
	kmem_cache_free(shifter_entry_cache, entry);
}

/* Drops the entries under @key whose connection is gone.  Process context. */
static void shifter_table_forget(struct shifter_table *table,
				 const struct shifter_key *key)
{
	struct shifter_entry *entry, *next;
	struct shifter_buckets *b;
	struct hlist_head *chain;
	unsigned long now = jiffies;

	spin_lock_bh(&table->lock);
	b = shifter_locked_buckets(table);
	chain = shifter_bucket(table, b, key);
	shifter_chain_for_each_safe(entry, next, b, chain) {
		if (memcmp(&entry->key, key, sizeof(*key)) ||
		    shifter_entry_young(entry, now) ||
		    shifter_entry_live(table->sn->net, entry))
			continue;
		shifter_entry_del(table, entry);
		atomic64_inc(&table->sn->stats.gone);
	}
	spin_unlock_bh(&table->lock);
}

/*
 * Finds the original destination of the connection whose reply tuple is
 * @key, if conntrack still holds the connection recorded under it, and
 * marks its entry answered.  An entry found whose connection is gone is
 * dropped.
 *
 * The accepted socket's two ends, all a redirector can ask with, name no
 * conntrack zone: when live connections in two zones share the reply
 * tuple, the key cannot say which one was accepted, and the answer is
 * -ENOTUNIQ rather than either connection's destination.  Called in
 * process context under rcu_read_lock().
 */
int shifter_table_lookup(struct shifter_table *table,
			 const struct shifter_key *key,
			 struct shifter_dest *dest)
{
	struct shifter_buckets *b = rcu_dereference(table->buckets);
	struct shifter_entry *entry, *found = NULL;
	unsigned long now = jiffies;
	bool stale = false;

	shifter_chain_for_each_rcu(entry, b, shifter_bucket(table, b, key)) {
		if (memcmp(&entry->key, key, sizeof(*key)) ||
		    shifter_entry_expired(entry, now))
			continue;
		if (!shifter_entry_live(table->sn->net, entry)) {
			stale = true;
			continue;
		}
		if (found)
			return -ENOTUNIQ;
		found = entry;
	}
	if (stale)
		shifter_table_forget(table, key);
	if (!found)
		return -ENOENT;
	dest->addr = found->orig.dst.u3;
	dest->port = found->orig.dst.u.tcp.port;
	WRITE_ONCE(found->answered, true);
	return 0;
}

unsigned int shifter_table_count(const struct shifter_table *table)
{
	return max(atomic_read(&table->count), 0);
}

/* An array of @chains empty chains, linked by entries' node @node. */
static struct shifter_buckets *shifter_buckets_new(unsigned int chains,
						   unsigned int node)
{
	struct shifter_buckets *b;
	unsigned int i;

	b = kmalloc(sizeof(*b), GFP_KERNEL_ACCOUNT);
	if (!b)
		return NULL;
	b->chain = kvmalloc_array(chains, sizeof(*b->chain), GFP_KERNEL_ACCOUNT);
	if (!b->chain) {
		kfree(b);
		return NULL;
	}
	b->mask = chains - 1;
	b->node = node;
	for (i = 0; i < chains; i++)
		INIT_HLIST_HEAD(&b->chain[i]);
	return b;
}

static void shifter_buckets_free(struct shifter_buckets *b)
{
	kvfree(b->chain);
	kfree(b);
}

/*
 * Moves the table's entries to an array of SHIFTER_GROW_FACTOR times as
 * many chains (or buckets_max).  Each entry is linked into the new array
 * by its other node, so look-ups that still walk the old array find every
 * entry there; the old array is freed once they are done.  This work is
 * the only writer of table->buckets, and never runs twice at once.
 */
static void shifter_table_grow(struct work_struct *work)
{
	struct shifter_table *table =
		container_of(work, struct shifter_table, grow);
	struct list_head *lists[] = { &table->fresh, &table->checked };
	struct shifter_buckets *old, *new;
	struct shifter_entry *entry;
	struct mem_cgroup *old_memcg;
	unsigned int chains, i;

	old = rcu_dereference_protected(table->buckets, true);
	chains = min((old->mask + 1) * SHIFTER_GROW_FACTOR, table->buckets_max);
	/* Charged, like the table, to the memory cgroup that enabled it. */
	old_memcg = set_active_memcg(table->memcg);
	new = shifter_buckets_new(chains, !old->node);
	set_active_memcg(old_memcg);

	spin_lock_bh(&table->lock);
	table->growing = false;
	if (!new) {
		/* Stays as it is; the next insert tries again. */
		spin_unlock_bh(&table->lock);
		return;
	}
	for (i = 0; i < ARRAY_SIZE(lists); i++)
		list_for_each_entry(entry, lists[i], age)
			hlist_add_head_rcu(&entry->node[new->node],
					   shifter_bucket(table, new, &entry->key));
	rcu_assign_pointer(table->buckets, new);
	spin_unlock_bh(&table->lock);

	synchronize_rcu();
	shifter_buckets_free(old);
}

/* Called in process context, by the command that enables a namespace. */
struct shifter_table *shifter_table_new(struct shifter_net *sn)
{
	struct shifter_buckets *b;
	struct shifter_table *table;
	unsigned int buckets;

	table = kzalloc(sizeof(*table), GFP_KERNEL_ACCOUNT);
	if (!table)
		return NULL;
	if (sn->net->user_ns == &init_user_ns) {
		table->max = shifter_max_entries;
		table->room = &shifter_room_init;
	} else {
		table->max = shifter_max_entries_userns;
		table->room = &shifter_room_userns;
	}
	/*
	 * About four entries a chain when the namespace is full; it starts
	 * with the fewest chains and grows as it fills.
	 */
	buckets = roundup_pow_of_two(max(table->max / 4, 1U));
	table->buckets_max = clamp(buckets, SHIFTER_BUCKETS_MIN,
				   SHIFTER_BUCKETS_MAX);
	b = shifter_buckets_new(min(SHIFTER_BUCKETS_MIN, table->buckets_max), 0);
	if (!b) {
		kfree(table);
		return NULL;
	}
	RCU_INIT_POINTER(table->buckets, b);
	INIT_WORK(&table->grow, shifter_table_grow);
	table->sn = sn;
	spin_lock_init(&table->lock);
	INIT_LIST_HEAD(&table->fresh);
	INIT_LIST_HEAD(&table->checked);
	get_random_bytes(&table->hash_key, sizeof(table->hash_key));
	table->memcg = get_mem_cgroup_from_mm(current->mm);
	INIT_DELAYED_WORK(&table->gc, shifter_table_gc);
	return table;
}

/*
 * Empties and frees a table that no hook and no look-up can reach any
 * more (an RCU grace period has passed since it was unpublished), entry
 * by entry.
 */
void shifter_table_free(struct shifter_table *table)
{
	struct list_head *lists[] = { &table->fresh, &table->checked };
	struct shifter_entry *entry, *tmp;
	unsigned int i, n = 0;

	cancel_delayed_work_sync(&table->gc);
	cancel_work_sync(&table->grow);
	for (i = 0; i < ARRAY_SIZE(lists); i++) {
		list_for_each_entry_safe(entry, tmp, lists[i], age) {
			list_del(&entry->age);
			shifter_unreserve(table);
			kmem_cache_free(shifter_entry_cache, entry);
			if (!(++n % SHIFTER_GC_BATCH))
				cond_resched();
		}
	}
	WARN_ON_ONCE(atomic_read(&table->count));
	mem_cgroup_put(table->memcg);
	shifter_buckets_free(rcu_dereference_protected(table->buckets, true));
	kfree(table);
}

int __init shifter_table_init(void)
{
	shifter_entry_cache = KMEM_CACHE(shifter_entry, 0);
	if (!shifter_entry_cache)
		return -ENOMEM;
	shifter_expiry = (unsigned long)shifter_expiry_secs * HZ;
	shifter_room_init.max = shifter_max_entries_total;
	shifter_room_userns.max = shifter_max_entries_userns_total;
	return 0;
}

/* Called once every table is gone. */
void shifter_table_exit(void)
{
	/* Let the call_rcu() frees finish before the cache goes. */
	rcu_barrier();
	WARN_ON_ONCE(atomic_read(&shifter_room_init.count));
	WARN_ON_ONCE(atomic_read(&shifter_room_userns.count));
	kmem_cache_destroy(shifter_entry_cache);
}
