// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the table of original destinations.
 *
 * One hash table for the whole module, keyed on (namespace, family, source
 * address, source port), with the namespace mixed into the hash.  Look-ups
 * walk a bucket under RCU; inserts and removals take shifter_table_lock
 * with bottom halves off (inserts come from the netfilter hooks) and free
 * entries with kfree_rcu().
 *
 * Each namespace also keeps its entries on a list in insertion order, so
 * the oldest entry is always the first: that is the one evicted when the
 * namespace reaches max_entries, and expiry only ever has to look at the
 * head of the list.  A per-namespace delayed work drops expired entries
 * while the namespace has any, so an idle table empties itself.
 *
 * Entries are never removed on FIN or RST: the redirector may accept a
 * connection only after its client has sent its data and closed, and the
 * look-up it then makes must still succeed.
 */

#include <linux/bug.h>
#include <linux/jhash.h>
#include <linux/hash.h>
#include <linux/jiffies.h>
#include <linux/log2.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/random.h>
#include <linux/rculist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <net/netns/hash.h>

#include "shifter_net.h"
#include "shifter_table.h"

#define SHIFTER_HASH_LOG_MIN	8
#define SHIFTER_HASH_LOG_MAX	18

struct shifter_entry {
	struct hlist_node node;
	struct list_head lru;
	struct shifter_net *sn;
	unsigned long stamp;
	struct shifter_tuple src;
	struct shifter_tuple dst;
	struct rcu_head rcu;
};

static_assert(sizeof(struct shifter_tuple) % sizeof(u32) == 0);

static DEFINE_SPINLOCK(shifter_table_lock);
static struct hlist_head *shifter_hash __read_mostly;
static unsigned int shifter_hash_log __read_mostly;
static u32 shifter_hash_seed __read_mostly;
static unsigned long shifter_expiry __read_mostly;

void shifter_tuple_set(struct shifter_tuple *tuple, u8 family,
		       const void *addr, __be16 port)
{
	memset(tuple, 0, sizeof(*tuple));
	tuple->family = family;
	tuple->port = port;
	if (family == AF_INET)
		memcpy(&tuple->addr.s6_addr32[0], addr, sizeof(__be32));
	else
		memcpy(&tuple->addr, addr, sizeof(struct in6_addr));
}

static struct hlist_head *shifter_bucket(const struct shifter_net *sn,
					 const struct shifter_tuple *src)
{
	u32 hash = jhash2((const u32 *)src, sizeof(*src) / sizeof(u32),
			  shifter_hash_seed ^ net_hash_mix(sn->net));

	return &shifter_hash[hash_32(hash, shifter_hash_log)];
}

static bool shifter_entry_expired(const struct shifter_entry *entry)
{
	return time_after_eq(jiffies, entry->stamp + shifter_expiry);
}

static void shifter_entry_del(struct shifter_net *sn,
			      struct shifter_entry *entry)
{
	lockdep_assert_held(&shifter_table_lock);
	hlist_del_rcu(&entry->node);
	list_del(&entry->lru);
	WRITE_ONCE(sn->count, sn->count - 1);
	kfree_rcu(entry, rcu);
}

static void shifter_table_expire(struct shifter_net *sn)
{
	struct shifter_entry *entry, *tmp;

	lockdep_assert_held(&shifter_table_lock);
	list_for_each_entry_safe(entry, tmp, &sn->lru, lru) {
		if (!shifter_entry_expired(entry))
			break;
		shifter_entry_del(sn, entry);
		atomic64_inc(&sn->expiries);
	}
}

static void shifter_table_gc(struct work_struct *work)
{
	struct shifter_net *sn = container_of(to_delayed_work(work),
					      struct shifter_net, gc);
	struct shifter_entry *oldest;

	spin_lock_bh(&shifter_table_lock);
	shifter_table_expire(sn);
	oldest = list_first_entry_or_null(&sn->lru, struct shifter_entry, lru);
	if (oldest)
		schedule_delayed_work(&sn->gc,
				      oldest->stamp + shifter_expiry - jiffies);
	spin_unlock_bh(&shifter_table_lock);
}

void shifter_table_insert(struct shifter_net *sn,
			  const struct shifter_tuple *src,
			  const struct shifter_tuple *dst)
{
	struct hlist_head *bucket = shifter_bucket(sn, src);
	struct shifter_entry *entry, *old;

	entry = kmalloc(sizeof(*entry), GFP_ATOMIC);
	if (!entry)
		return;
	entry->sn = sn;
	entry->stamp = jiffies;
	entry->src = *src;
	entry->dst = *dst;

	spin_lock_bh(&shifter_table_lock);
	shifter_table_expire(sn);

	hlist_for_each_entry(old, bucket, node) {
		if (old->sn == sn && !memcmp(&old->src, src, sizeof(*src)))
			break;
	}
	if (old) {
		/* A new SYN from the same source: the new destination wins. */
		hlist_replace_rcu(&old->node, &entry->node);
		list_del(&old->lru);
		kfree_rcu(old, rcu);
	} else {
		if (sn->count >= shifter_max_entries) {
			old = list_first_entry(&sn->lru, struct shifter_entry,
					       lru);
			shifter_entry_del(sn, old);
			atomic64_inc(&sn->evictions);
		}
		hlist_add_head_rcu(&entry->node, bucket);
		WRITE_ONCE(sn->count, sn->count + 1);
	}
	list_add_tail(&entry->lru, &sn->lru);
	atomic64_inc(&sn->inserts);
	/* Does nothing when the work is already pending for an older entry. */
	schedule_delayed_work(&sn->gc, shifter_expiry);
	spin_unlock_bh(&shifter_table_lock);
}

bool shifter_table_lookup(struct shifter_net *sn,
			  const struct shifter_tuple *src,
			  struct shifter_tuple *dst)
{
	struct hlist_head *bucket = shifter_bucket(sn, src);
	struct shifter_entry *entry;
	bool found = false;

	atomic64_inc(&sn->lookups);
	rcu_read_lock();
	hlist_for_each_entry_rcu(entry, bucket, node) {
		if (entry->sn != sn || memcmp(&entry->src, src, sizeof(*src)))
			continue;
		if (!shifter_entry_expired(entry)) {
			*dst = entry->dst;
			found = true;
		}
		break;
	}
	rcu_read_unlock();
	atomic64_inc(found ? &sn->hits : &sn->misses);
	return found;
}

unsigned int shifter_table_count(const struct shifter_net *sn)
{
	return READ_ONCE(sn->count);
}

void shifter_table_net_init(struct shifter_net *sn)
{
	INIT_LIST_HEAD(&sn->lru);
	INIT_DELAYED_WORK(&sn->gc, shifter_table_gc);
}

/* Called once the namespace's hooks are gone and an RCU grace period later. */
void shifter_table_net_exit(struct shifter_net *sn)
{
	struct shifter_entry *entry, *tmp;

	cancel_delayed_work_sync(&sn->gc);
	spin_lock_bh(&shifter_table_lock);
	list_for_each_entry_safe(entry, tmp, &sn->lru, lru)
		shifter_entry_del(sn, entry);
	spin_unlock_bh(&shifter_table_lock);
}

int shifter_table_init(void)
{
	/* About two entries a bucket when a namespace is full. */
	unsigned int log = order_base_2(max(shifter_max_entries / 2, 1U));

	shifter_hash_log = clamp(log, SHIFTER_HASH_LOG_MIN,
				 SHIFTER_HASH_LOG_MAX);
	shifter_hash = kvcalloc(1U << shifter_hash_log, sizeof(*shifter_hash),
				GFP_KERNEL);
	if (!shifter_hash)
		return -ENOMEM;
	shifter_hash_seed = get_random_u32();
	shifter_expiry = (unsigned long)shifter_expiry_secs * HZ;
	return 0;
}

/* Called once every namespace has let go of its entries. */
void shifter_table_exit(void)
{
	/* Let the kfree_rcu() callbacks finish before the module goes. */
	rcu_barrier();
	kvfree(shifter_hash);
}
