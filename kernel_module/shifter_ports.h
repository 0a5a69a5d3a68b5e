/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: the destination ports watched in each namespace.
 */

#ifndef _SHIFTER_PORTS_H
#define _SHIFTER_PORTS_H

#include <linux/types.h>

struct shifter_net;

/* The watched destination ports of one namespace, replaced as a whole. */
struct shifter_ports {
	struct rcu_head rcu;
	unsigned int count;
	u16 port[];
};

struct shifter_ports *shifter_ports_new(const u16 *port, unsigned int count);
void shifter_ports_net_exit(struct shifter_net *sn);

bool shifter_ports_watched(const struct shifter_net *sn, u16 port);
unsigned int shifter_ports_get(const struct shifter_net *sn, u16 *port);
void shifter_ports_replace(struct shifter_net *sn,
			   struct shifter_ports *ports);

#endif /* _SHIFTER_PORTS_H */
