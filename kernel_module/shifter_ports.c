// SPDX-License-Identifier: GPL-2.0
/*
 * Shifter: the destination ports watched in each namespace.
 *
 * A namespace's ports are a small array, read under RCU by the hooks for
 * every TCP SYN and replaced whole, under shifter_ports_mutex, when user
 * space sets new ones.  A namespace starts with the ports of the module
 * parameter "ports".
 */

#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>

#include "shifter_net.h"
#include "shifter_ports.h"

static DEFINE_MUTEX(shifter_ports_mutex);

/* Copies @count ports, leaving out repeats; order is kept. */
static struct shifter_ports *shifter_ports_new(const u16 *port,
					       unsigned int count)
{
	struct shifter_ports *ports;
	unsigned int i, j;

	if (count > SHIFTER_MAX_PORTS)
		return ERR_PTR(-EINVAL);
	ports = kzalloc(sizeof(*ports), GFP_KERNEL);
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

int shifter_ports_net_init(struct shifter_net *sn)
{
	struct shifter_ports *ports;

	ports = shifter_ports_new(shifter_default_ports,
				  shifter_default_nports);
	if (IS_ERR(ports))
		return PTR_ERR(ports);
	RCU_INIT_POINTER(sn->ports, ports);
	return 0;
}

/* Called once the namespace's hooks are gone and an RCU grace period later. */
void shifter_ports_net_exit(struct shifter_net *sn)
{
	kfree(rcu_dereference_protected(sn->ports, true));
	RCU_INIT_POINTER(sn->ports, NULL);
}

/* Called under rcu_read_lock(), as netfilter hooks are. */
bool shifter_ports_watched(const struct shifter_net *sn, u16 port)
{
	const struct shifter_ports *ports = rcu_dereference(sn->ports);
	unsigned int i;

	for (i = 0; i < ports->count; i++) {
		if (ports->port[i] == port)
			return true;
	}
	return false;
}

/* Copies the ports into @port, which has room for SHIFTER_MAX_PORTS. */
unsigned int shifter_ports_get(const struct shifter_net *sn, u16 *port)
{
	const struct shifter_ports *ports;
	unsigned int count;

	rcu_read_lock();
	ports = rcu_dereference(sn->ports);
	count = ports->count;
	memcpy(port, ports->port, count * sizeof(*port));
	rcu_read_unlock();
	return count;
}

int shifter_ports_set(struct shifter_net *sn, const u16 *port,
		      unsigned int count)
{
	struct shifter_ports *ports, *old;

	ports = shifter_ports_new(port, count);
	if (IS_ERR(ports))
		return PTR_ERR(ports);
	mutex_lock(&shifter_ports_mutex);
	old = rcu_replace_pointer(sn->ports, ports,
				  lockdep_is_held(&shifter_ports_mutex));
	mutex_unlock(&shifter_ports_mutex);
	kfree_rcu(old, rcu);
	return 0;
}
