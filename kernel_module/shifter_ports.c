// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the destination ports watched in each namespace.
 *
 * A namespace's ports are a small array, read under RCU by the hook for
 * every new redirected connection and replaced whole, under the
 * namespace's lock, when user space sets new ones.  Until then the
 * namespace watches the ports of the module parameter "ports", which
 * cost it nothing.
 */

#include <linux/err.h>
#include <linux/overflow.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>

#include "shifter_net.h"
#include "shifter_ports.h"

/* Copies @count ports, leaving out repeats; order is kept. */
struct shifter_ports *shifter_ports_new(const u16 *port, unsigned int count)
{
	struct shifter_ports *ports;
	unsigned int i, j;

	if (count > SHIFTER_MAX_PORTS)
		return ERR_PTR(-EINVAL);
	ports = kzalloc(struct_size(ports, port, count), GFP_KERNEL_ACCOUNT);
	if (!ports)
		return ERR_PTR(-ENOMEM);
	for (i = 0; i < count; i++) {
		if (!port[i]) {
			kfree(ports);
			return ERR_PTR(-EINVAL);
		}
		for (j = 0; j < ports->count; j++) {
			if (ports->port[j] == port[i])
				break;
		}
		if (j == ports->count)
			ports->port[ports->count++] = port[i];
	}
	return ports;
}

/* Called once the namespace's hooks are gone and an RCU grace period later. */
void shifter_ports_net_exit(struct shifter_net *sn)
{
	kfree(rcu_dereference_protected(sn->ports, true));
	RCU_INIT_POINTER(sn->ports, NULL);
}

static bool shifter_ports_find(const u16 *port, unsigned int count, u16 wanted)
{
	unsigned int i;

	for (i = 0; i < count; i++) {
		if (port[i] == wanted)
			return true;
	}
	return false;
}

/* Called under rcu_read_lock(), as netfilter hooks are. */
bool shifter_ports_watched(const struct shifter_net *sn, u16 port)
{
	const struct shifter_ports *ports = rcu_dereference(sn->ports);

	if (!ports)
		return shifter_ports_find(shifter_default_ports,
					  shifter_default_nports, port);
	return shifter_ports_find(ports->port, ports->count, port);
}

/* Copies the ports into @port, which has room for SHIFTER_MAX_PORTS. */
unsigned int shifter_ports_get(const struct shifter_net *sn, u16 *port)
{
	const struct shifter_ports *ports;
	unsigned int count, i;

	rcu_read_lock();
	ports = rcu_dereference(sn->ports);
	if (ports) {
		count = ports->count;
		memcpy(port, ports->port, count * sizeof(*port));
	} else {
		count = shifter_default_nports;
		for (i = 0; i < count; i++)
			port[i] = shifter_default_ports[i];
	}
	rcu_read_unlock();
	return count;
}

/* Called under sn->lock. */
void shifter_ports_replace(struct shifter_net *sn, struct shifter_ports *ports)
{
	struct shifter_ports *old;

	old = rcu_replace_pointer(sn->ports, ports,
				  lockdep_is_held(&sn->lock));
	if (old)
		kfree_rcu(old, rcu);
}
