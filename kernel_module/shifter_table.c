// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the table of redirected connections of one namespace.
 *
 * Each namespace that records has a table of its own, made when it is
 * enabled and charged, with its entries, to the memory cgroup of the
 * process that enabled it.  An entry is filed under the connection's
 * reply tuple, the key the redirector asks with, in a bucket chosen by a
 * siphash keyed afresh for every table, so no one outside can aim at a
 * bucket.  Look-ups walk a bucket under RCU; writers take that bucket's
 * lock only, with bottom halves off (the hook records from softirq), and
 * free entries after a grace period.
 *
 * Memory is bounded three ways: max_entries per namespace, so one cannot
 * crowd another; max_entries_total for the whole module; and
 * SHIFTER_BUCKET_MAX per bucket.  A connection that finds no room is not
 * recorded (and counted as such): an entry is never pushed out to make
 * room, so nothing that arrives can displace a live connection's entry.
 *
 * An entry answers only while conntrack still holds the connection it was
 * made for: the look-up asks conntrack for the reply tuple and compares
 * the connection it finds with the original tuple recorded.  A SYN that
 * was dropped after the hook (by a later rule, or by conntrack itself
 * when it could not confirm the connection) leaves an entry that never
 * answers; a later connection that reuses the key replaces an entry whose
 * connection is gone, and never one whose connection is alive.
 *
 * Entries are told apart by key and conntrack zone: conntrack keeps reply
 * tuples unique per zone only (conntrack zones over VRFs with overlapping
 * addresses), so a second zone's connection with the same reply tuple gets
 * an entry of its own.  A look-up names no zone (the accepted socket
 * carries none), so while both connections live it is ambiguous and
 * answered -ENOTUNIQ: never the other zone's destination.
 *
 * A delayed work sweeps each table in batches of SHIFTER_GC_BATCH buckets,
 * bucket lock by bucket lock, dropping entries past expiry_secs and
 * entries whose connection conntrack no longer holds; it stops while the
 * table is empty.  Nothing ever holds a lock over the whole table.
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
#include <linux/workqueue.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_core.h>
#include <net/netfilter/nf_conntrack_tuple.h>
#include <net/netfilter/nf_conntrack_zones.h>

#include "shifter_net.h"
#include "shifter_table.h"

#define SHIFTER_BUCKET_MAX	16
#define SHIFTER_BUCKETS_MIN	64U
#define SHIFTER_BUCKETS_MAX	65536U
#define SHIFTER_GC_BATCH	256
#define SHIFTER_GC_INTERVAL	HZ
/* How long a new entry's connection may still wait for confirmation. */
#define SHIFTER_GRACE		HZ

struct shifter_entry {
	struct hlist_node node;
	struct shifter_key key;
	struct nf_conntrack_tuple orig;
	struct nf_conntrack_zone zone;
	unsigned long stamp;
	struct rcu_head rcu;
};

struct shifter_bucket {
	/* Taken by writers of this bucket only; readers use RCU. */
	spinlock_t lock;
	unsigned int count;
	struct hlist_head head;
};

struct shifter_table {
	struct shifter_net *sn;
	struct mem_cgroup *memcg;
	siphash_key_t hash_key;
	unsigned int mask;
	atomic_t count;
	unsigned int gc_next;
	struct delayed_work gc;
	struct shifter_bucket bucket[];
};

static_assert(sizeof(struct shifter_key) % sizeof(u32) == 0);

static struct kmem_cache *shifter_entry_cache __ro_after_init;
static unsigned long shifter_expiry __ro_after_init;
static atomic_t shifter_entries_total = ATOMIC_INIT(0);

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

static struct shifter_bucket *shifter_bucket(struct shifter_table *table,
					     const struct shifter_key *key)
{
	u64 hash = siphash(key, sizeof(*key), &table->hash_key);

	return &table->bucket[hash & table->mask];
}

static bool shifter_entry_expired(const struct shifter_entry *entry,
				  unsigned long now)
{
	return time_after_eq(now, READ_ONCE(entry->stamp) + shifter_expiry);
}

/*
 * Whether conntrack holds the very connection @entry was recorded for: a
 * connection whose reply tuple is the entry's key and whose original
 * tuple is the one recorded.
 */
static bool shifter_entry_live(struct net *net,
			       const struct shifter_entry *entry)
{
	const struct nf_conntrack_tuple_hash *h;
	struct nf_conntrack_tuple reply;
	struct nf_conn *ct;
	bool live;

	shifter_key_to_reply(&entry->key, &reply);
	h = nf_conntrack_find_get(net, &entry->zone, &reply);
	if (!h)
		return false;
	ct = nf_ct_tuplehash_to_ctrack(h);
	live = NF_CT_DIRECTION(h) == IP_CT_DIR_REPLY &&
	       nf_ct_tuple_equal(&entry->orig,
				 &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple);
	nf_ct_put(ct);
	return live;
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

static void shifter_entry_free_rcu(struct rcu_head *head)
{
	kmem_cache_free(shifter_entry_cache,
			container_of(head, struct shifter_entry, rcu));
}

static bool shifter_reserve(struct shifter_table *table)
{
	if (atomic_inc_return(&table->count) > shifter_max_entries)
		goto err_table;
	if (atomic_inc_return(&shifter_entries_total) >
	    shifter_max_entries_total)
		goto err_total;
	return true;

err_total:
	atomic_dec(&shifter_entries_total);
err_table:
	atomic_dec(&table->count);
	return false;
}

static void shifter_unreserve(struct shifter_table *table)
{
	atomic_dec(&shifter_entries_total);
	atomic_dec(&table->count);
}

/* Called with @bucket's lock held. */
static void shifter_entry_del(struct shifter_table *table,
			      struct shifter_bucket *bucket,
			      struct shifter_entry *entry)
{
	lockdep_assert_held(&bucket->lock);
	hlist_del_rcu(&entry->node);
	WRITE_ONCE(bucket->count, bucket->count - 1);
	shifter_unreserve(table);
	call_rcu(&entry->rcu, shifter_entry_free_rcu);
}

/*
 * Drops the bucket's entries that expired, and those past their grace
 * whose connection conntrack no longer holds.  Called with the bucket's
 * lock held.
 */
static void shifter_bucket_reap(struct shifter_table *table,
				struct shifter_bucket *bucket)
{
	struct shifter_stats *stats = &table->sn->stats;
	struct shifter_entry *entry;
	struct hlist_node *tmp;
	unsigned long now = jiffies;

	hlist_for_each_entry_safe(entry, tmp, &bucket->head, node) {
		if (shifter_entry_expired(entry, now)) {
			shifter_entry_del(table, bucket, entry);
			atomic64_inc(&stats->expiries);
		} else if (time_after_eq(now, entry->stamp + SHIFTER_GRACE) &&
			   !shifter_entry_live(table->sn->net, entry)) {
			shifter_entry_del(table, bucket, entry);
			atomic64_inc(&stats->gone);
		}
	}
}

static void shifter_table_gc(struct work_struct *work)
{
	struct shifter_table *table =
		container_of(to_delayed_work(work), struct shifter_table, gc);
	unsigned int end = min(table->gc_next + SHIFTER_GC_BATCH,
			       table->mask + 1);
	struct shifter_bucket *bucket;
	unsigned int i;

	for (i = table->gc_next; i < end; i++) {
		bucket = &table->bucket[i];
		if (!READ_ONCE(bucket->count))
			continue;
		spin_lock_bh(&bucket->lock);
		shifter_bucket_reap(table, bucket);
		spin_unlock_bh(&bucket->lock);
	}

	if (end <= table->mask) {
		/* More of this sweep: let other work run in between. */
		table->gc_next = end;
		queue_delayed_work(system_power_efficient_wq, &table->gc, 0);
	} else {
		table->gc_next = 0;
		/* An insert re-arms the work once the table is empty. */
		if (atomic_read(&table->count))
			queue_delayed_work(system_power_efficient_wq,
					   &table->gc, SHIFTER_GC_INTERVAL);
	}
}

/*
 * Records @ct, a new connection that destination NAT sent to this host;
 * called from the hook, in softirq or with bottom halves off, under RCU.
 */
void shifter_table_record(struct shifter_table *table, const struct nf_conn *ct)
{
	struct shifter_stats *stats = &table->sn->stats;
	struct shifter_entry *entry, *old;
	struct shifter_bucket *bucket;
	struct mem_cgroup *old_memcg;

	if (!shifter_reserve(table))
		goto full;

	/* Charged to the memory cgroup that enabled this namespace. */
	old_memcg = set_active_memcg(table->memcg);
	entry = kmem_cache_alloc(shifter_entry_cache,
				 GFP_ATOMIC | __GFP_ACCOUNT | __GFP_NOWARN);
	set_active_memcg(old_memcg);
	if (!entry)
		goto err_reserved;

	shifter_key_from_ct(&entry->key, ct);
	entry->orig = ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;
	entry->zone = *nf_ct_zone(ct);
	entry->stamp = jiffies;
	bucket = shifter_bucket(table, &entry->key);

	spin_lock_bh(&bucket->lock);
	hlist_for_each_entry(old, &bucket->head, node) {
		if (shifter_entry_same(old, &entry->key, &entry->zone))
			break;
	}
	if (old) {
		if (nf_ct_tuple_equal(&old->orig, &entry->orig)) {
			/* The same connection's SYN, seen again. */
			WRITE_ONCE(old->stamp, entry->stamp);
			goto err_locked;
		}
		/*
		 * Conntrack confirms no second connection with a live one's
		 * reply tuple: this one's SYN is about to be dropped.
		 */
		if (shifter_entry_live(table->sn->net, old))
			goto err_locked;
		hlist_replace_rcu(&old->node, &entry->node);
		spin_unlock_bh(&bucket->lock);
		shifter_unreserve(table);
		call_rcu(&old->rcu, shifter_entry_free_rcu);
		atomic64_inc(&stats->gone);
		goto recorded;
	}
	if (bucket->count >= SHIFTER_BUCKET_MAX) {
		shifter_bucket_reap(table, bucket);
		if (bucket->count >= SHIFTER_BUCKET_MAX) {
			spin_unlock_bh(&bucket->lock);
			kmem_cache_free(shifter_entry_cache, entry);
			shifter_unreserve(table);
			goto full;
		}
	}
	hlist_add_head_rcu(&entry->node, &bucket->head);
	WRITE_ONCE(bucket->count, bucket->count + 1);
	spin_unlock_bh(&bucket->lock);

recorded:
	atomic64_inc(&stats->inserts);
	if (!delayed_work_pending(&table->gc))
		queue_delayed_work(system_power_efficient_wq, &table->gc,
				   SHIFTER_GC_INTERVAL);
	return;

err_locked:
	spin_unlock_bh(&bucket->lock);
	kmem_cache_free(shifter_entry_cache, entry);
	shifter_unreserve(table);
	return;

err_reserved:
	shifter_unreserve(table);
full:
	atomic64_inc(&stats->full);
}

/*
 * Finds the original destination of the connection whose reply tuple is
 * @key, if conntrack still holds the connection recorded under it.
 *
 * The accepted socket's two ends, all a redirector can ask with, name no
 * conntrack zone: when live connections in two zones share the reply
 * tuple, the key cannot say which one was accepted, and the answer is
 * -ENOTUNIQ rather than either connection's destination.  Called under
 * rcu_read_lock().
 */
int shifter_table_lookup(struct shifter_table *table,
			 const struct shifter_key *key,
			 struct shifter_dest *dest)
{
	struct shifter_bucket *bucket = shifter_bucket(table, key);
	unsigned long now = jiffies;
	struct shifter_entry *entry;
	bool found = false;

	hlist_for_each_entry_rcu(entry, &bucket->head, node) {
		if (memcmp(&entry->key, key, sizeof(*key)))
			continue;
		if (shifter_entry_expired(entry, now) ||
		    !shifter_entry_live(table->sn->net, entry))
			continue;
		if (found)
			return -ENOTUNIQ;
		found = true;
		dest->addr = entry->orig.dst.u3;
		dest->port = entry->orig.dst.u.tcp.port;
	}
	return found ? 0 : -ENOENT;
}

unsigned int shifter_table_count(const struct shifter_table *table)
{
	return max(atomic_read(&table->count), 0);
}

/* Called in process context, by the command that enables a namespace. */
struct shifter_table *shifter_table_new(struct shifter_net *sn)
{
	unsigned int buckets, i;
	struct shifter_table *table;

	/* About four entries a bucket when the namespace is full. */
	buckets = roundup_pow_of_two(max(shifter_max_entries / 4, 1U));
	buckets = clamp(buckets, SHIFTER_BUCKETS_MIN, SHIFTER_BUCKETS_MAX);
	table = kvzalloc(struct_size(table, bucket, buckets),
			 GFP_KERNEL_ACCOUNT);
	if (!table)
		return NULL;
	for (i = 0; i < buckets; i++) {
		spin_lock_init(&table->bucket[i].lock);
		INIT_HLIST_HEAD(&table->bucket[i].head);
	}
	table->sn = sn;
	table->mask = buckets - 1;
	get_random_bytes(&table->hash_key, sizeof(table->hash_key));
	table->memcg = get_mem_cgroup_from_mm(current->mm);
	INIT_DELAYED_WORK(&table->gc, shifter_table_gc);
	return table;
}

/*
 * Empties and frees a table that no hook and no look-up can reach any
 * more (an RCU grace period has passed since it was unpublished), bucket
 * by bucket.
 */
void shifter_table_free(struct shifter_table *table)
{
	struct shifter_bucket *bucket;
	struct shifter_entry *entry;
	struct hlist_node *tmp;
	unsigned int i;

	cancel_delayed_work_sync(&table->gc);
	for (i = 0; i <= table->mask; i++) {
		bucket = &table->bucket[i];
		spin_lock_bh(&bucket->lock);
		hlist_for_each_entry_safe(entry, tmp, &bucket->head, node) {
			hlist_del(&entry->node);
			shifter_unreserve(table);
			kmem_cache_free(shifter_entry_cache, entry);
		}
		bucket->count = 0;
		spin_unlock_bh(&bucket->lock);
		if (!(i % SHIFTER_GC_BATCH))
			cond_resched();
	}
	WARN_ON_ONCE(atomic_read(&table->count));
	mem_cgroup_put(table->memcg);
	kvfree(table);
}

int __init shifter_table_init(void)
{
	shifter_entry_cache = KMEM_CACHE(shifter_entry, 0);
	if (!shifter_entry_cache)
		return -ENOMEM;
	shifter_expiry = (unsigned long)shifter_expiry_secs * HZ;
	return 0;
}

/* Called once every table is gone. */
void shifter_table_exit(void)
{
	/* Let the call_rcu() frees finish before the cache goes. */
	rcu_barrier();
	WARN_ON_ONCE(atomic_read(&shifter_entries_total));
	kmem_cache_destroy(shifter_entry_cache);
}
