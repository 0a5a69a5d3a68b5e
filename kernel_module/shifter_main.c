// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the original destination of redirected TCP connections.
 *
 * Module parameters, per-namespace set-up and tear-down, and the order in
 * which the parts come up and go down: the entry cache first, then the
 * per-namespace state, and the generic netlink family last, so that user
 * space can only reach a module that is whole; on the way out the family
 * goes first.  Loading the module registers no hook anywhere: a namespace
 * gets its hooks and its table when it enables the module (see
 * shifter_hooks.c).  The module is not loaded on demand by a look-up of
 * its family: an administrator loads it.
 */

#include <linux/bits.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/netdevice.h>
#include <net/genetlink.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>

#include "shifter_net.h"
#include "shifter_hooks.h"
#include "shifter_netlink.h"
#include "shifter_ports.h"
#include "shifter_table.h"

/* A day: long enough for any handshake, short enough for jiffies math. */
#define SHIFTER_EXPIRY_SECS_MAX	(24 * 60 * 60)
#define SHIFTER_MAX_ENTRIES_MAX	BIT(24)

unsigned int shifter_max_entries __read_mostly = 65536;
module_param_named(max_entries, shifter_max_entries, uint, 0444);
MODULE_PARM_DESC(max_entries,
		 "Most connections remembered per network namespace (default 65536)");

unsigned int shifter_max_entries_total __read_mostly = 262144;
module_param_named(max_entries_total, shifter_max_entries_total, uint, 0444);
MODULE_PARM_DESC(max_entries_total,
		 "Most connections remembered in all network namespaces together (default 262144)");

unsigned int shifter_max_entries_userns __read_mostly = 4096;
module_param_named(max_entries_userns, shifter_max_entries_userns, uint, 0444);
MODULE_PARM_DESC(max_entries_userns,
		 "Most connections remembered per network namespace owned by a user namespace other than the initial one (default 4096)");

unsigned int shifter_max_entries_userns_total __read_mostly = 16384;
module_param_named(max_entries_userns_total, shifter_max_entries_userns_total,
		   uint, 0444);
MODULE_PARM_DESC(max_entries_userns_total,
		 "Most connections remembered in all those namespaces together, apart from max_entries_total (default 16384)");

bool shifter_userns __read_mostly;
module_param_named(userns, shifter_userns, bool, 0444);
MODULE_PARM_DESC(userns,
		 "Let CAP_NET_ADMIN in the user namespace owning a network namespace enable recording there; else only CAP_NET_ADMIN in the initial one may (default N)");

unsigned int shifter_expiry_secs __read_mostly = 120;
module_param_named(expiry_secs, shifter_expiry_secs, uint, 0444);
MODULE_PARM_DESC(expiry_secs,
		 "Seconds a connection's destination is remembered after its SYN (default 120)");

unsigned short shifter_default_ports[SHIFTER_MAX_PORTS] = { 443 };
unsigned int shifter_default_nports = 1;
module_param_array_named(ports, shifter_default_ports, ushort,
			 &shifter_default_nports, 0444);
MODULE_PARM_DESC(ports,
		 "Destination ports a namespace watches until it sets its own, comma-separated (default 443)");

unsigned int shifter_net_id __read_mostly;

static int __net_init shifter_net_init(struct net *net)
{
	struct shifter_net *sn = shifter_pernet(net);

	sn->net = net;
	mutex_init(&sn->lock);
	return 0;
}

static void __net_exit shifter_net_pre_exit(struct net *net)
{
	shifter_hooks_net_pre_exit(shifter_pernet(net));
}

/* The core waits for an RCU grace period between pre_exit and exit. */
static void __net_exit shifter_net_exit(struct net *net)
{
	struct shifter_net *sn = shifter_pernet(net);

	shifter_hooks_net_exit(sn);
	shifter_ports_net_exit(sn);
	mutex_destroy(&sn->lock);
}

/*
 * An interface a namespace records on going away: record nothing rather
 * than whatever interface reuses its index.  Under RTNL; lock-free against
 * ENABLE, which writes the index under sn->lock.
 */
static int shifter_netdev_event(struct notifier_block *nb,
				unsigned long event, void *ptr)
{
	struct net_device *dev = netdev_notifier_info_to_dev(ptr);
	struct shifter_net *sn;

	if (event != NETDEV_UNREGISTER)
		return NOTIFY_DONE;
	sn = shifter_pernet(dev_net(dev));
	cmpxchg(&sn->ifindex, dev->ifindex, SHIFTER_IFINDEX_GONE);
	return NOTIFY_DONE;
}

static struct notifier_block shifter_netdev_notifier = {
	.notifier_call	= shifter_netdev_event,
};

static struct pernet_operations shifter_net_ops = {
	.init		= shifter_net_init,
	.pre_exit	= shifter_net_pre_exit,
	.exit		= shifter_net_exit,
	.id		= &shifter_net_id,
	.size		= sizeof(struct shifter_net),
};

static int __init shifter_check_params(void)
{
	unsigned int i;

	if (!shifter_max_entries ||
	    shifter_max_entries > SHIFTER_MAX_ENTRIES_MAX) {
		pr_err("max_entries must be between 1 and %lu\n",
		       SHIFTER_MAX_ENTRIES_MAX);
		return -EINVAL;
	}
	if (!shifter_max_entries_total ||
	    shifter_max_entries_total > SHIFTER_MAX_ENTRIES_MAX) {
		pr_err("max_entries_total must be between 1 and %lu\n",
		       SHIFTER_MAX_ENTRIES_MAX);
		return -EINVAL;
	}
	if (!shifter_max_entries_userns ||
	    shifter_max_entries_userns > SHIFTER_MAX_ENTRIES_MAX) {
		pr_err("max_entries_userns must be between 1 and %lu\n",
		       SHIFTER_MAX_ENTRIES_MAX);
		return -EINVAL;
	}
	if (!shifter_max_entries_userns_total ||
	    shifter_max_entries_userns_total > SHIFTER_MAX_ENTRIES_MAX) {
		pr_err("max_entries_userns_total must be between 1 and %lu\n",
		       SHIFTER_MAX_ENTRIES_MAX);
		return -EINVAL;
	}
	if (!shifter_expiry_secs ||
	    shifter_expiry_secs > SHIFTER_EXPIRY_SECS_MAX) {
		pr_err("expiry_secs must be between 1 and %u\n",
		       SHIFTER_EXPIRY_SECS_MAX);
		return -EINVAL;
	}
	for (i = 0; i < shifter_default_nports; i++) {
		if (!shifter_default_ports[i]) {
			pr_err("ports may not include port 0\n");
			return -EINVAL;
		}
	}
	return 0;
}

static int __init shifter_init(void)
{
	int ret;

	ret = shifter_check_params();
	if (ret)
		return ret;

	ret = shifter_table_init();
	if (ret)
		return ret;

	ret = register_pernet_subsys(&shifter_net_ops);
	if (ret)
		goto err_table;

	ret = register_netdevice_notifier(&shifter_netdev_notifier);
	if (ret)
		goto err_pernet;

	ret = shifter_genl_init();
	if (ret)
		goto err_notifier;

	pr_info("ready: up to %u entries per namespace, %u in all, for %u s; in user namespaces' %u and %u, enabled by %s\n",
		shifter_max_entries, shifter_max_entries_total,
		shifter_expiry_secs, shifter_max_entries_userns,
		shifter_max_entries_userns_total,
		shifter_userns ? "their own admins" : "initial admins only");
	return 0;

err_notifier:
	unregister_netdevice_notifier(&shifter_netdev_notifier);
err_pernet:
	unregister_pernet_subsys(&shifter_net_ops);
err_table:
	shifter_table_exit();
	return ret;
}

static void __exit shifter_exit(void)
{
	shifter_genl_exit();
	unregister_netdevice_notifier(&shifter_netdev_notifier);
	/* Each namespace: hooks off, a grace period, its table emptied. */
	unregister_pernet_subsys(&shifter_net_ops);
	shifter_table_exit();
}

module_init(shifter_init);
module_exit(shifter_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Shifter: original destinations of redirected TCP connections");
MODULE_AUTHOR("The Shifter authors");
/* The Python package's version (shifter.__version__), as is dkms.conf's. */
MODULE_VERSION("0.1.0");
